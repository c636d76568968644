"""The `tibillet` backend: TiBillet's scan API online, its RSA-PSS signed QR codes offline.

Online, an entry scan is `POST {prefix}ticket/` (the server marks the ticket scanned) and an exit
scan or `gated lookup` is `POST {prefix}check_ticket/` (no change on the server). Offline, the QR
text `DATA:SIGNATURE` is verified against the configured event public keys and the ticket's uuid
is the anti-passback identity, because one ticket can be printed as several valid code texts.
Offline entries are replayed with `ticket` once the API answers; "already scanned" by this very
device means an earlier replay got through, so it counts as uploaded.

The API key comes from `gated pair CODE` (`GET {prefix}{code}/pair`), kept in the store, or from
`api_key_file`. A refused key is treated as the API being unreachable: the gate keeps deciding
offline, the log says to pair again, and queued scans wait instead of being parked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from gated.config import Config
from gated.errors import BackendRejected, Unreachable
from gated.model import Decision, Reason, Scan, ScanMode, Source, admit, deny
from gated.policy.answer import ID_LIMIT, cut, ident, mapping, text
from gated.policy.base import Backend, UploadResult
from gated.policy.http import HttpBackend, json_body, request
from gated.policy.signatures import load_rsa_public_key, verify_tibillet
from gated.schema import Key
from gated.store import Store, StoreThread

log = logging.getLogger(__name__)

SCHEMA = {
    "path_prefix": Key("str", default="/api/scan/",
                       help='where the scan API lives: "/api/scan/" (current servers) or "/scan/"'),
    "public_keys": Key("pathlist", default=[], help="PEM public key files, one per event, for offline checks"),
    "event_uuid": Key("str", default="", help="the event this lane admits; sent with each scan when set"),
    "api_key_file": Key("secret", default="", help="file holding the API key, instead of `gated pair`"),
}

KV_API_KEY = "tibillet:api_key"
KV_DEVICE_UUID = "tibillet:device_uuid"
KV_DEVICE_NAME = "tibillet:device_name"
SLOW_CALL_SECONDS = 10.0  # pairing and uploads are not on a visitor's clock


class TibilletBackend(HttpBackend):
    name = "tibillet"

    def __init__(self, config: Config):
        super().__init__(config)
        prefix = self.options.get("path_prefix", "/api/scan/").strip("/")
        self.prefix = f"/{prefix}/" if prefix else "/"
        self.event_uuid: str = self.options.get("event_uuid", "")
        self.api_key_file: str = self.options.get("api_key_file", "")
        self.keys: list[RSAPublicKey] = []
        self.key_events: list[str] = []  # the event each key belongs to: its file name without .pem
        self.key_problems: list[str] = []
        for path in self.options.get("public_keys", []):
            try:
                self.keys.append(load_rsa_public_key(Path(path).read_bytes()))
                self.key_events.append(Path(path).stem)
            except (OSError, ValueError) as e:
                self.key_problems.append(f"[backend.tibillet] public_keys: {path}: {e}; this event's codes "
                                         "cannot be checked offline")
        self.slow_seconds = SLOW_CALL_SECONDS
        self.api_key: str | None = None
        self.device_uuid: str | None = None
        self._store: StoreThread | None = None


    def describe(self) -> str:
        paired = "API key loaded" if self.api_key else "not paired"
        return f"tibillet ({len(self.keys)} event key(s) for offline, {paired})"

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
        if self._store is not None and self.device_uuid is None:
            self.device_uuid = await self._store.call(Store.get, KV_DEVICE_UUID)

    def _headers(self) -> dict[str, str]:
        if not self.api_key:
            raise Unreachable("not paired: run `gated pair CODE` (or set [backend.tibillet] api_key_file)")
        return {"Authorization": f"Api-Key {self.api_key}"}

    async def _post(self, endpoint: str, token: str, **kw: Any) -> httpx.Response:
        body = {"qrcode_data": token}
        if self.event_uuid and endpoint == "ticket/":
            body["event_uuid"] = self.event_uuid
        response = await request(self.client, "POST", self.prefix + endpoint, json=body,
                                 headers=self._headers(), **kw)
        _refuse_auth(response)
        return response

    # --- online ------------------------------------------------------------------------

    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        # TiBillet has no exit scans: an exit asks check_ticket, which changes nothing on the server.
        endpoint = "check_ticket/" if scan_mode is ScanMode.EXIT else "ticket/"
        return self._decision(await self._post(endpoint, scan.token))

    def _decision(self, response: httpx.Response) -> Decision:
        body = json_body(response)
        if not isinstance(body, dict):
            raise Unreachable(f"HTTP {response.status_code} with an unexpected JSON shape")
        _, text_, uuid, who, event = _answer_fields(body)
        common = dict(source=Source.ONLINE, backend=self.name,
                      backend_code=cut(f"{response.status_code} {text_}".strip(), ID_LIMIT),
                      event_id=event, message=who or text_)
        code = response.status_code
        if code == 200 and not isinstance(body.get("success"), bool):
            # Every 200 of the scan API says success true or false; without it this is not TiBillet's
            # answer (another API version, a proxy's page): decide offline rather than deny online.
            raise Unreachable("HTTP 200 without a success flag")
        if code == 200 and body.get("success") is True:
            return admit(Reason.OK, ticket_key=uuid, **common)
        if code == 200 and "already" in text_.lower():
            return deny(Reason.ALREADY_USED, ticket_key=uuid, **common)
        lowered = text_.lower()
        if code == 400 and "event uuid" in lowered:
            # The server wants the event named: a setting, not this visitor's ticket.
            raise Unreachable("TiBillet wants the event: set [backend.tibillet] event_uuid")
        if code == 404:
            return deny(Reason.UNKNOWN, **common)
        if code == 406 and "event" in lowered:
            return deny(Reason.WRONG_EVENT, **common)
        if code == 400 and "signature" in lowered:
            return deny(Reason.INVALID_SIGNATURE, **common)
        if code in (400, 406):
            return deny(Reason.MALFORMED, **common)
        return deny(Reason.REJECTED, **common)

    async def probe(self) -> None:
        if not self.api_key:
            await self._load_credentials()  # `gated pair` may have run meanwhile
        response = await request(self.client, "GET", self.prefix + "test_api/", headers=self._headers())
        _refuse_auth(response)
        if response.status_code != 200:
            raise Unreachable(f"test_api answered HTTP {response.status_code}")
        body = json_body(response)
        info = body.get("device_info") if isinstance(body, dict) else None
        if isinstance(info, dict) and isinstance(info.get("uuid"), str):
            self.device_uuid = info["uuid"]

    async def lookup(self, token: str) -> list[str] | None:
        response = await self._post("check_ticket/", token)
        body = json_body(response)
        if response.status_code != 200 or not isinstance(body, dict):
            return [cut(f"HTTP {response.status_code}: {body}")]
        t = mapping(body.get("ticket"), "ticket")
        lines = [f"{k}: {t.get(k)}" for k in ("uuid", "status", "is_scanned", "event", "first_name", "last_name",
                                              "product", "price", "scanned_by")]
        reservation = mapping(body.get("reservation"), "reservation")
        lines.append(f"reservation: {reservation.get('uuid')} ({reservation.get('tickets_count')} tickets)")
        return lines

    # --- pairing -------------------------------------------------------------------------

    async def pair(self, store: StoreThread, token: str) -> str:
        token = token.strip()
        if not token:
            raise BackendRejected("the pairing code is empty")
        path = f"{self.prefix}{quote(token, safe='=')}/pair"
        response = await request(self.client, "GET", path, timeout=self.slow_seconds)
        try:
            body = json_body(response)
        except Unreachable:
            raise BackendRejected(f"no TiBillet scan API answered (HTTP {response.status_code}, not JSON): check "
                                  "[backend] url and [backend.tibillet] path_prefix") from None
        key = body.get("api_key") if isinstance(body, dict) else None
        if response.status_code != 200 or not isinstance(key, str) or not key or len(key) > ID_LIMIT:
            why = body.get("error") or body.get("detail") if isinstance(body, dict) else None
            raise BackendRejected(f"TiBillet refused the pairing code (HTTP {response.status_code}"
                                  f"{': ' + str(why) if why else ''}); codes are single-use and expire: "
                                  "make a new one in the TiBillet admin")
        self.api_key, self.device_uuid = key, cut(str(body.get("device_uuid") or ""), ID_LIMIT)
        name = cut(str(body.get("device_name") or ""))
        await store.call(Store.set, KV_API_KEY, self.api_key)
        await store.call(Store.set, KV_DEVICE_UUID, self.device_uuid)
        await store.call(Store.set, KV_DEVICE_NAME, name)
        lines = [f'paired with TiBillet as device "{name}" ({self.device_uuid})',
                 f"API key stored in {store.store.path} (owner-only)"]
        if self.api_key_file:
            lines.append("note: [backend.tibillet] api_key_file is set and takes precedence over the paired key")
        try:
            response = await request(self.client, "GET", self.prefix + "test_api/", headers=self._headers(),
                                     timeout=self.slow_seconds)
            answer = json_body(response)
            server = answer.get("server_info") if isinstance(answer, dict) else None
            tenant = server.get("tenant") if isinstance(server, dict) else None
            lines.append(f"test_api: HTTP {response.status_code}, tenant {cut(str(tenant))!r}")
        except Unreachable as e:
            lines.append(f"test_api not reachable ({e}); pairing is stored all the same")
        return "\n".join(lines)

    # --- offline -------------------------------------------------------------------------

    def data_age(self, store: Store, now: float) -> float | None:
        # The keys are configuration, not a downloaded copy: they cannot go stale. Without keys
        # there is nothing to decide with, and the configured fallback applies.
        return 0.0 if self.keys else None

    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        check = verify_tibillet(scan.token, self.keys)
        if check.reason is not Reason.OK:
            return deny(check.reason, backend=self.name, message=check.detail)
        event = self.key_events[check.key_index] if check.key_index is not None else None
        return admit(Reason.OK, backend=self.name, ticket_key=check.uuid, event_id=event,
                     message=f"signed for {event}")

    # --- upload --------------------------------------------------------------------------

    async def upload(self, rows: list[dict[str, Any]]) -> UploadResult:
        """Replay offline entries with `ticket`, one request each; nothing else has an endpoint."""
        if self.device_uuid is None:
            try:
                await self.probe()
            except Unreachable:
                pass  # decided per row below: without it, "already scanned" cannot be told apart
        async def send(row: dict[str, Any]) -> str | None:
            response = await self._post("ticket/", row["token"], timeout=self.slow_seconds)
            return self._upload_refusal(response)

        return await self.replay(rows, _replayable, send)  # a deny, an exit or nobody passed: nothing to replay

    def _upload_refusal(self, response: httpx.Response) -> str | None:
        """None when the server now counts the scan, else why it never will; Unreachable when it did not say."""
        body = json_body(response)  # a proxy's HTML page or broken JSON is no answer: retried, not parked
        if not isinstance(body, dict):
            raise Unreachable(f"HTTP {response.status_code} with an unexpected JSON shape")
        _answer_fields(body)
        if response.status_code == 200 and body.get("success") is True:
            return None
        ticket = body.get("ticket") if isinstance(body.get("ticket"), dict) else {}
        text = cut(str(body.get("message") or body.get("error") or body.get("detail") or ""))
        if response.status_code == 200 and "already" in str(text).lower():
            by = ticket.get("scanned_by")
            if by is None or self.device_uuid is None or by == self.device_uuid:
                return None  # our own earlier replay (or the server does not say whose): counted once
            return f"already scanned by another device ({by}): the ticket entered twice"
        return f"HTTP {response.status_code}: {text}"


def _answer_fields(body: dict[str, Any]) -> tuple[dict[str, Any], str, str | None, str, str | None]:
    """(ticket, message, ticket uuid, holder's name, event) of a scan answer, each checked.

    A wrong type means this is not TiBillet's answer: Unreachable.
    """
    ticket = mapping(body.get("ticket"), "ticket")
    said = next((body[k] for k in ("message", "error", "detail") if body.get(k)), None)
    # DRF's validation errors are objects or lists: kept as text, they still explain a refusal.
    message = cut(str(said)) if isinstance(said, (dict, list)) else text(said, "message")
    uuid = ticket.get("uuid")
    if uuid is not None and not isinstance(uuid, str):  # the anti-passback identity: text only
        raise Unreachable("ticket uuid is not text")
    who = " ".join(text(ticket.get(k), k, limit=100) for k in ("first_name", "last_name")).strip()
    return ticket, message, ident(uuid, "ticket uuid"), who, ident(ticket.get("event"), "ticket event")


def _replayable(row: dict[str, Any]) -> bool:
    return (row["verdict"] == "admit" and row["scan_mode"] == "entry" and row["passed"] != 0
            and bool(row["token"]))


def _refuse_auth(response: httpx.Response) -> None:
    if response.status_code in (401, 403):
        raise Unreachable(f"API key refused (HTTP {response.status_code}); pair again with `gated pair CODE`")


def create(config: Config) -> Backend:
    return TibilletBackend(config)
