"""The `pretixdroid` backend: the legacy pretixdroid plugin API, for pretix installations that still run it.

Online: `POST /pretixdroid/api/{organizer}/{event}/redeem/?key=KEY` with the form field `secret`;
`search/` serves `gated lookup`, `status/` the breaker's probe. The API has no signed tickets and
no list to download, so offline there is no data (`data_age` is None) and `[offline] fallback`
decides, with local anti-passback. Scans admitted offline are replayed with `redeem` once the API
answers; the API takes no time stamp, so pretix records the upload time, and `already_redeemed`
counts as uploaded (the ticket is checked in either way). Current pretix releases no longer serve
this API: use `type = "pretix"` there.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from gated.config import Config
from gated.errors import ConfigError, Unreachable
from gated.model import Decision, Reason, Scan, ScanMode, Source, admit, deny
from gated.policy.answer import ID_LIMIT, text
from gated.policy.base import Backend, UploadResult
from gated.policy.http import HttpBackend, json_body, request
from gated.schema import Key
from gated.secrets import read_secret
from gated.store import Store, StoreThread
from gated.tokens import redact

log = logging.getLogger(__name__)

SCHEMA = {
    "organizer": Key("str", help="the organizer's short name (slug), as in the pretix URL"),
    "event": Key("str", help="the event's short name (slug)"),
    "key_file": Key("secret", help="file holding the pretixdroid API key shown in the event's pretixdroid settings"),
}

REASONS = {"unpaid": Reason.NOT_PAID, "already_redeemed": Reason.ALREADY_USED, "unknown_ticket": Reason.UNKNOWN}
SLOW_CALL_SECONDS = 10.0


class PretixdroidBackend(HttpBackend):
    name = "pretixdroid"

    def __init__(self, config: Config):
        super().__init__(config)
        self.base = f"/pretixdroid/api/{self.options.organizer}/{self.options.event}/"
        self.key_file: str = self.options.key_file
        self.key: str | None = None


    def describe(self) -> str:
        return f"pretixdroid ({self.options.organizer}/{self.options.event}, no offline data: fallback decides)"

    async def start(self, store: StoreThread) -> None:
        self._load_key()

    def _load_key(self) -> None:
        try:
            self.key = read_secret(self.key_file, "[backend.pretixdroid] key_file")
        except ConfigError as e:
            log.error("%s", "; ".join(e.problems), extra={"GATED_EVENT": "config_problem"})


    async def _call(self, method: str, endpoint: str, params: dict[str, str] | None = None,
                    **kw: Any) -> httpx.Response:
        if not self.key:
            self._load_key()
            if not self.key:
                raise Unreachable("no API key: [backend.pretixdroid] key_file cannot be read")
        # The key travels in the query string, as the API wants; http.request never puts URLs in messages.
        response = await request(self.client, method, self.base + endpoint,
                                 params={"key": self.key, **(params or {})}, **kw)
        if response.status_code == 403:
            raise Unreachable("API key refused (HTTP 403); check [backend.pretixdroid] key_file")
        if response.status_code == 404:
            raise Unreachable("unknown organizer or event (HTTP 404); check [backend.pretixdroid] organizer and event")
        return response

    async def _redeem(self, secret: str, **kw: Any) -> dict[str, Any]:
        response = await self._call("POST", "redeem/", data={"secret": secret}, **kw)
        body = json_body(response)
        if response.status_code != 200 or not isinstance(body, dict) or body.get("status") not in ("ok", "error"):
            raise Unreachable(f"HTTP {response.status_code}: not a redeem answer")
        return body

    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        if scan_mode is ScanMode.EXIT:
            # The API only checks people in; an exit lane asks `search` and lets known tickets out.
            return await self._exit(scan)
        body = await self._redeem(scan.token)
        if body["status"] == "ok":
            return admit(Reason.OK, Source.ONLINE, backend=self.name, backend_code="ok", ticket_key=scan.token)
        code = text(body.get("reason"), "redeem reason", limit=ID_LIMIT)
        return deny(REASONS.get(code, Reason.REJECTED), Source.ONLINE, backend=self.name, backend_code=code)

    async def _exit(self, scan: Scan) -> Decision:
        results = await self._search(scan.token)
        match = next((r for r in results if r.get("secret") == scan.token), None)
        if match is None:
            return deny(Reason.UNKNOWN, Source.ONLINE, backend=self.name, backend_code="search: no match")
        return admit(Reason.OK, Source.ONLINE, backend=self.name, backend_code="search",
                     message=text(match.get("attendee_name"), "attendee_name"), ticket_key=scan.token)

    async def _search(self, query: str) -> list[dict[str, Any]]:
        response = await self._call("GET", "search/", params={"query": query})
        body = json_body(response)
        results = body.get("results") if isinstance(body, dict) else None
        if response.status_code != 200 or not isinstance(results, list):
            raise Unreachable(f"search answered HTTP {response.status_code} without a results list")
        return [r for r in results if isinstance(r, dict)]

    async def probe(self) -> None:
        response = await self._call("GET", "status/")
        if response.status_code != 200:
            raise Unreachable(f"status answered HTTP {response.status_code}")
        json_body(response)

    async def lookup(self, token: str) -> list[str] | None:
        results = await self._search(token)
        if not results:
            return ["no match (the API answers nothing for fewer than 4 characters)"]
        return [f"order {r.get('order')}: {r.get('item')}{' / ' + str(r['variation']) if r.get('variation') else ''}, "
                f"{r.get('attendee_name') or '-'}, paid {r.get('paid')}, redeemed {r.get('redeemed')}, "
                f"secret {redact(str(r.get('secret', '')))}" for r in results]

    def data_age(self, store: Store, now: float) -> float | None:
        return None  # nothing to download: [offline] fallback always applies

    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        # Reached only under fallback = "policy": with no offline data there is no rule that admits.
        return deny(Reason.OFFLINE_NO_DATA, backend=self.name,
                    message='pretixdroid has no offline data; set [offline] fallback = "admit" to keep lanes moving')

    async def upload(self, rows: list[dict[str, Any]]) -> UploadResult:
        async def send(row: dict[str, Any]) -> str | None:
            body = await self._redeem(row["token"], timeout=SLOW_CALL_SECONDS)
            code = body.get("reason")
            if body["status"] == "ok" or code == "already_redeemed":
                return None
            return f"admitted offline, pretix says {code}"

        return await self.replay(rows, lambda r: r["verdict"] == "admit" and r["scan_mode"] == "entry"
                                 and r["passed"] != 0 and bool(r["token"]), send)


def create(config: Config) -> Backend:
    return PretixdroidBackend(config)
