"""The `pretix` backend: pretix's device API online; the check-in list's data and signed secrets offline.

Pairing (`gated pair TOKEN`, or the setup QR's JSON text) calls `POST /api/v1/device/initialize`
and keeps the device token in the store; every later call carries `Authorization: Device <token>`.
Scans go to `checkinrpc/redeem/` with the lane's check-in list, `type` entry/exit and the scan's
nonce, so a retry after a lost answer is counted once. A visitor who did not pass the turnstile
is annulled by that nonce (`checkinrpc/annul/`).

Offline, as pretixSCAN does: the syncer downloads the event (signing keys, time zone, dates), this
device's gate, the check-in list's settings and rules, the revoked and blocked secret lists, and
every ticket of the event with its order's state and its check-ins on the list (`orders/`, whole
the first time, then changes by `modified_since`). A scan is then decided by pretix's own checks in
pretix's order (`_decide`): canceled, blocked, not approved, validity window, product / date,
unpaid, the list's `rules` (`pretix_rules.evaluate`), then entries already made, counting the
server's check-ins together with this lane's own. A signed secret is verified with Ed25519 first; a
signed ticket not (yet) in the download is decided from its signed payload. Offline entries are
uploaded by replaying redeem with the original `datetime`, the same `nonce` and `force: true`.

Long because pairing, the online redeem, the offline download and pretix's own order of checks
share one session, one list's settings and one reading of pretix's answers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from nacl.signing import VerifyKey

from gated import __version__, reload
from gated.config import Config
from gated.device import hardware
from gated.errors import BackendRejected, GatedError, Unreachable
from gated.logs import clean
from gated.model import Decision, Reason, Scan, ScanMode, Source, admit, deny
from gated.policy.answer import ID_LIMIT, LONE_SURROGATE, cut, ident, integer, mapping, text
from gated.policy.base import Backend, UploadResult
from gated.policy.http import LIST_PAGE_LIMIT, HttpBackend, error_text, json_answer, json_body, pairing_answer, request
from gated.policy.pretix_rules import CheckIn, Facts, evaluate
from gated.policy.pretix_sig1 import load_sig1_keys, verify_sig1
from gated.schema import Key
from gated.store import Store, StoreThread
from gated.timeparse import iso, parse_time
from gated.tokens import redact

log = logging.getLogger(__name__)

SCHEMA = {
    "organizer": Key("str", help="the organizer's short name (slug), as in the pretix URL"),
    "event": Key("str", help="the event's short name (slug)"),
    "checkin_list": Key("int", minimum=1, maximum=2**63 - 1,
                        help="the ID of the check-in list this lane scans against"),
    "token_file": Key("secret", default="", help="file holding a device API token, instead of `gated pair`"),
}

KV_TOKEN = "pretix:api_token"
KV_DEVICE = "pretix:device"
HANDSHAKE_VERSION = 1
SLOW_CALL_SECONDS = 30.0  # sync, pairing and uploads are not on a visitor's clock
MANY = 1_000_000  # "allow multiple entries": no offline anti-passback limit
MAX_SECRET = 4096  # no scan is longer (the gate refuses longer input as malformed)
GONE = "gone"  # a downloaded ticket pretix would not find on this list (canceled alone, or another date)
# What a list-file row holds; a new version downloads every order again (2: the add-ons' secrets;
# 3: a ticket canceled on its own, which a card still finds).
ROWS_VERSION = 3
# Add-ons of one ticket looked at offline (each is one lookup on the scan's path); a ticket with more
# is not decided offline. pretix's shops sell a handful at most.
ADDONS_LIMIT = 32
# A check-in of this lane found again in the server's download: the server's time is the scan's
# (uploads send it, to the millisecond) or, online, when the redeem arrived, within the deadline.
SAME_CHECKIN_SECONDS = 5.0

# pretix's redeem reasons -> one vocabulary. `invalid_time` is refined from the position's validity.
REASONS = {
    "invalid": Reason.UNKNOWN,
    "unpaid": Reason.NOT_PAID,
    "blocked": Reason.BLOCKED,
    "invalid_time": Reason.INVALID_TIME,
    "canceled": Reason.CANCELED,
    "already_redeemed": Reason.ALREADY_USED,
    "product": Reason.PRODUCT_NOT_ALLOWED,
    "rules": Reason.RULES,
    "ambiguous": Reason.AMBIGUOUS,
    "revoked": Reason.REVOKED,
    "unapproved": Reason.NOT_APPROVED,
    "error": Reason.REJECTED,  # pretix's own internal error, reported as a refusal
}


class Forbidden(Unreachable):
    """pretix answered 403: the device may not read this (its security profile, the event's settings)."""


class NotFound(BackendRejected):
    """pretix answered 404 for a list resource: this pretix has none (an older version)."""


class PretixBackend(HttpBackend):
    name = "pretix"

    def __init__(self, config: Config):
        super().__init__(config)
        self.organizer: str = self.options.organizer
        self.event: str = self.options.event
        self.list_id: int = self.options.checkin_list
        self.token_file: str = self.options.get("token_file", "")
        self.scope = f"{self.organizer}/{self.event}"
        self.org_path = f"/api/v1/organizers/{self.organizer}"
        self.event_path = f"{self.org_path}/events/{self.event}"
        self.offline_name = f"pretix:{self.scope}:offline"
        self.revoked_name = f"pretix-revoked:{self.scope}"
        self.blocked_name = f"pretix-blocked:{self.scope}"
        self.positions_name = f"pretix-positions:{self.scope}"
        self.dates_name = f"pretix-dates:{self.scope}"  # a series' dates, for rules on their times
        self.media_name = f"pretix-media:{self.scope}"  # reusable media (barcode cards linked to tickets)
        self._media_refused = False
        self.token: str | None = None
        self._store: StoreThread | None = None
        self._keys: tuple[float, list[VerifyKey]] = (-1.0, [])
        self._reload_list: dict[str, Any] = {}  # in the reload process: the list's settings (restore_state)
        self.last_reload: dict[str, Any] = {}  # the last full download's result (benchmarks read its peak RSS)


    def describe(self) -> str:
        paired = "device token loaded" if self.token else "not paired"
        return f"pretix ({self.scope}, check-in list {self.list_id}, {paired})"

    async def start(self, store: StoreThread) -> None:
        self._store = store
        await self._load_credentials()
        if self.token is None:
            log.warning("pretix: no device token yet; run `gated pair TOKEN` with the device's setup token "
                        "(deciding offline until then)", extra={"GATED_EVENT": "not_paired"})

    async def _load_credentials(self) -> None:
        self.token = await self._credential(self._store, self.token_file, "[backend.pretix] token_file", KV_TOKEN)

    def _headers(self) -> dict[str, str]:
        if not self.token:
            raise Unreachable("not paired: run `gated pair TOKEN` (or set [backend.pretix] token_file)")
        return {"Authorization": f"Device {self.token}"}

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        response = await request(self.client, method, path, headers=self._headers(), **kw)
        if response.status_code == 401:
            raise Unreachable("device token refused (HTTP 401); pair again with `gated pair TOKEN`")
        if response.status_code == 403:
            raise Forbidden(f"HTTP 403: this device may not use organizer {self.organizer!r}, event "
                              f"{self.event!r} or check-in list {self.list_id} (see the device's settings in pretix)")
        return response

    def _redeem_body(self, secret: str, scan_mode: str, nonce: str) -> dict[str, Any]:
        # Scanners deliver the printed secret as text whether it came from a barcode, a QR code or
        # a wallet pass, so the source is always pretix's default "barcode".
        return {"secret": secret, "source_type": "barcode", "lists": [self.list_id], "type": scan_mode,
                "force": False, "ignore_unpaid": False, "nonce": nonce, "questions_supported": False,
                # Without it pretix says `unpaid` for a canceled order; with it, `canceled`, as offline.
                "canceled_supported": True}

    # --- online ------------------------------------------------------------------------

    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        response = await self._call("POST", f"{self.org_path}/checkinrpc/redeem/",
                                    json=self._redeem_body(scan.token, str(scan_mode), scan.nonce))
        return self._decision(response, scan.token)

    def _decision(self, response: httpx.Response, secret: str) -> Decision:
        body = json_body(response)
        status = body.get("status") if isinstance(body, dict) else None
        if status not in ("ok", "error", "incomplete"):
            # A validation error about our request ({"lists": [...]}) says nothing about the ticket.
            raise Unreachable(f"HTTP {response.status_code}: pretix did not take the request: "
                              f"{error_text(response, _words, body)}")
        if status == "ok" and not 200 <= response.status_code < 300:
            raise Unreachable(f"HTTP {response.status_code} with an \"ok\" body: not pretix's answer")
        position, who, event_id = _redeem_fields(body)
        common = dict(source=Source.ONLINE, backend=self.name, event_id=event_id, message=who)
        if status == "ok":
            if body.get("require_attention"):
                common["message"] = f"{who} (attention)".strip()
            # Under `addon_match` pretix checks in the add-on the scanned ticket carries: count that one.
            checked = position.get("secret")
            if not isinstance(checked, str) or not 0 < len(checked) <= MAX_SECRET or LONE_SURROGATE.search(checked):
                checked = secret  # pretix has checked someone in: an odd field must not undo that here
            return admit(Reason.OK, backend_code="ok", ticket_key=checked, **common)
        if status == "incomplete":
            return deny(Reason.REJECTED, backend_code="incomplete",
                        **(common | {"message": "pretix asks questions at check-in, which a gate cannot answer"}))
        code = text(body.get("reason"), "redeem reason", limit=ID_LIMIT) or "error"
        reason = REASONS.get(code, Reason.REJECTED)
        if reason is Reason.INVALID_TIME:
            reason = _time_side(position, time.time())
        explanation = text(body.get("reason_explanation"), "reason_explanation")
        if explanation:
            common["message"] = cut(f"{who}: {explanation}") if who else explanation
        return deny(reason, backend_code=code, **common)

    async def probe(self) -> None:
        if not self.token:
            await self._load_credentials()  # `gated pair` may have run meanwhile
        response = await self._call("GET", f"{self.event_path}/")
        if response.status_code != 200:
            raise Unreachable(f"event detail answered HTTP {response.status_code}")

    async def ticket_count(self) -> int | None:
        """The check-in list's `position_count` from its status (the list's detail view is closed to a
        pretixscan device)."""
        body = await self._get_json(f"{self.event_path}/checkinlists/{self.list_id}/status/", "check-in list status")
        count = body.get("position_count") if isinstance(body, dict) else None
        return count if isinstance(count, int) and 0 <= count < 2**62 else None

    def offline_count(self, store: Store) -> int | None:
        """The downloaded tickets pretix counts in `position_count`: on this list (product, date), not
        canceled, the order paid, or pending on an `include_pending` list or `valid_if_pending`
        (pretix 2026.8.0's `CheckinList.positions`). None before a download."""
        data = store.get_data(self.offline_name)
        if data is None or not data[0].get("positions"):
            return None
        lst = data[0].get("list") or {}
        orders = ("p", "n") if lst.get("include_pending") else ("p",)
        products = None if lst.get("all_products", True) else set(lst.get("limit_products") or [])
        count = 0
        for status, facts in store.ticket_rows(self.positions_name):
            if status not in ("p", "n") or not facts:
                continue
            ticket = json.loads(facts)
            if status in orders or ticket.get("pending_ok"):
                count += products is None or ticket.get("item") in products
        return count

    async def lookup(self, token: str) -> list[str] | None:
        response = await self._call("GET", f"{self.org_path}/checkinrpc/search/",
                                    params={"list": self.list_id, "search": token}, timeout=SLOW_CALL_SECONDS,
                                    limit=LIST_PAGE_LIMIT)
        body = await json_answer(response)
        if response.status_code != 200 or not isinstance(body, dict):
            return [f"HTTP {response.status_code}: {error_text(response, _words, body)}"]
        lines = [f"{body.get('count', 0)} match(es) on check-in list {self.list_id}"]
        results = body.get("results")
        tickets = [p for p in results if isinstance(p, dict)] if isinstance(results, list) else []
        for p in tickets[:10]:
            checkins = p.get("checkins")
            entries = sum(1 for c in checkins if isinstance(c, dict) and c.get("type", "entry") == "entry") \
                if isinstance(checkins, list) else 0
            lines.append(f"order {p.get('order')}-{p.get('positionid')}: item {p.get('item')}, "
                         f"{p.get('attendee_name') or '-'}, {entries} entry check-in(s), "
                         f"secret {redact(str(p.get('secret')))}")
        return [clean(line) for line in lines]  # names from the server reach the terminal

    # --- pairing -------------------------------------------------------------------------

    async def pair(self, store: StoreThread, token: str) -> str:
        setup = _setup_token(token, self.config.backend.url)
        body = {"token": setup, "hardware_brand": hardware()[0], "hardware_model": hardware()[1],
                "os_name": platform.system(), "os_version": platform.release(),
                "software_brand": "gated", "software_version": __version__}
        response = await request(self.client, "POST", "/api/v1/device/initialize", json=body,
                                 timeout=SLOW_CALL_SECONDS)
        answer, self.token = pairing_answer(
            response, "api_token", _field_errors,
            not_json=f"no pretix device API answered (HTTP {response.status_code}, not JSON): check [backend] url",
            refused="pretix refused the setup token", fix="tokens are single-use: make a new device in pretix")
        device = {k: cut(str(answer.get(k)), ID_LIMIT) for k in ("organizer", "device_id", "unique_serial", "name",
                                                                   "gate")}
        stored = await self._keep_pairing(store, {KV_TOKEN: self.token, KV_DEVICE: json.dumps(device)},
                                          "device token")
        lines = [f'paired with pretix as device "{device["name"]}" (serial {device["unique_serial"]}, '
                 f'organizer {device["organizer"]})', stored]
        if device["organizer"] != self.organizer:
            lines.append(f"warning: [backend.pretix] organizer is {self.organizer!r} but this device belongs to "
                         f"{device['organizer']!r}: scans will be refused until they match")
        if self.token_file:
            lines.append("note: [backend.pretix] token_file is set and takes precedence over the paired token")
        try:
            response = await self._call("GET", f"{self.event_path}/", timeout=SLOW_CALL_SECONDS)
            event = json_body(response)
            name = _text(event.get("name")) if isinstance(event, dict) else "(not pretix's event shape)"
            lines.append(f"event {self.event!r}: HTTP {response.status_code}, {cut(name)!r}")
        except Unreachable as e:
            lines.append(f"event {self.event!r} not readable yet ({e}); pairing is stored all the same")
        return "\n".join(clean(line) for line in lines)  # names from the server reach the terminal

    # --- offline data --------------------------------------------------------------------

    async def sync(self, store: StoreThread) -> None:
        try:
            await self._sync(store)
        except GatedError:
            raise
        except (AttributeError, TypeError, KeyError, ValueError) as e:
            # pretix answered, but not in its documented shapes (another version, a proxy's JSON):
            # the offline data already stored stays in use, and the syncer says why at WARNING.
            raise _unexpected_shape(e) from None

    async def _sync(self, store: StoreThread) -> None:
        event = mapping(await self._get_json(f"{self.event_path}/", "event detail"), "event detail")
        keys = mapping(event.get("valid_keys"), "valid_keys").get("pretix_sig1") or []
        try:
            load_sig1_keys(keys)
        except (ValueError, TypeError) as e:
            raise BackendRejected(f"the event's pretix_sig1 keys cannot be read: {e}") from None
        zone = text(event.get("timezone"), "event timezone", limit=ID_LIMIT) or "UTC"
        try:
            ZoneInfo(zone)
        except (ValueError, ZoneInfoNotFoundError):
            raise BackendRejected(f"the event's time zone {zone!r} is not known here (tzdata)") from None
        dates = {k: parse_time(event.get(k)) for k in ("date_from", "date_to", "date_admission")}
        lists, _ = await self._get_all(f"{self.event_path}/checkinlists/", {}, "check-in lists")
        found = [x for x in lists if isinstance(x, dict) and x.get("id") == self.list_id]
        if not found:
            ids = ", ".join(str(x.get("id")) for x in lists if isinstance(x, dict)) or "none"
            raise BackendRejected(f"[backend.pretix] checkin_list = {self.list_id}: not a check-in list of event "
                                  f"{self.event!r} (its lists: {ids})")
        kept = _list_settings(found[0])
        gate = await self._gate()
        revoked = await self._sync_secrets(store, "revokedsecrets", "created", self.revoked_name)
        blocked = await self._sync_secrets(store, "blockedsecrets", "updated", self.blocked_name)
        tickets, whole = await self._sync_positions(store, kept)
        series = await self._sync_dates(store, kept) if event.get("has_subevents") and kept["rules"] else 0
        # A ticket given a new secret does not change its card in pretix: new revocations reload every card.
        media = await self._sync_media(store, whole=revoked > 0)
        await store.call(Store.put_data, self.offline_name, {
            "keys": keys, "list": kept, "has_subevents": bool(event.get("has_subevents")), "timezone": zone,
            "dates": dates, "gate": gate, "positions": True, "media": media is not None})
        log.info("pretix offline data refreshed: %d signing key(s), list %s, %d ticket(s) %s, %d revoked and "
                 "%d blocked secret(s) new%s", len(keys), self.list_id, tickets, "in all" if whole else "changed",
                 revoked, blocked, (f", {series} date(s) of the series" if series else "")
                 + (f", {media} reusable medi{'um' if media == 1 else 'a'} new or changed" if media else ""),
                 extra={"GATED_EVENT": "sync"})

    async def _sync_dates(self, store: StoreThread, lst: dict[str, Any]) -> int:
        """The times of the series' dates (`subevents/`) that the list's rules may build on
        (`buildTime` of `date_from`, `date_to`, `date_admission`): the list's own date, or every date."""
        if lst.get("subevent"):
            rows = _date_rows(await self._get_json(f"{self.event_path}/subevents/{lst['subevent']}/", "date"))
        else:
            rows, _ = await self._get_all(f"{self.event_path}/subevents/", {}, "dates", each=_date_rows)
        return await store.call(Store.load_tickets, self.dates_name, rows)

    async def _sync_media(self, store: StoreThread, whole: bool = False) -> int | None:
        """Reusable media of type barcode (cards pretix links to tickets, e.g. season passes), each
        with the secrets of its tickets of this event: everything the first time, then those updated
        since. None when pretix does not let this device read them (an older pretix, a profile)."""
        since_key = f"pretix:{self.scope}:media_since"
        usable = not whole and await store.call(Store.list_usable, self.media_name)
        since = await store.call(Store.get, since_key) if usable else None
        params = {"type": "barcode", "expand": "linked_orderpositions", "ordering": "-updated"}
        if since:
            params["updated_since"] = since
        try:
            rows, generated = await self._get_all(f"{self.org_path}/reusablemedia/", params, "reusable media",
                                                  each=lambda m: _medium_rows(m, self.event))
        except (Forbidden, NotFound) as e:
            if not self._media_refused:
                self._media_refused = True
                log.info("pretix does not let this device read reusable media (%s): a card's barcode is decided "
                         "online only", e, extra={"GATED_EVENT": "offline_limit"})
            return None
        await store.call(Store.upsert_tickets if since else Store.load_tickets, self.media_name, rows)
        if isinstance(generated, str) and 0 < len(generated) <= ID_LIMIT:
            await store.call(Store.set, since_key, generated)
        return len(rows)

    async def _gate(self) -> int | None:
        """This device's gate in pretix (the rules' `gate`), from `device/info`; None when it has none."""
        response = await self._call("GET", "/api/v1/device/info", timeout=SLOW_CALL_SECONDS)
        if response.status_code != 200:
            raise BackendRejected(f"device info: HTTP {response.status_code}")
        device = mapping(mapping(await json_answer(response), "device info").get("device"), "device")
        return integer(mapping(device.get("gate"), "device gate").get("id"), "device gate id")

    async def _sync_positions(self, store: StoreThread, lst: dict[str, Any]) -> tuple[int, bool]:
        """Every ticket of the event with what a decision needs, into the list file `positions_name`.

        From `orders/`, not `checkinlists/{id}/positions/`: pretix 2026.8.0 ignores `modified_since`
        on the positions (every delta would be the whole list) and leaves out tickets of products not
        on the list, which pretix refuses as `product`, not as unknown. The whole list the first time
        (and whenever the list's date changes or its file is unusable), then the orders changed since
        the previous download's `X-Page-Generated`; a check-in or cancellation changes its order.
        """
        since_key = f"pretix:{self.scope}:orders_since:{self.list_id}:{lst.get('subevent')}:{ROWS_VERSION}"
        usable = await store.call(Store.list_usable, self.positions_name)
        since = await store.call(Store.get, since_key) if usable else None
        if since:
            rows, generated = await self._get_all(f"{self.event_path}/orders/", {"modified_since": since}, "orders",
                                                  each=lambda order: _position_rows(order, self.list_id, lst))
            await store.call(Store.upsert_tickets, self.positions_name, rows)
            count = len(rows)
        else:
            count, generated = await self._load_all_positions(store, lst)
        if isinstance(generated, str) and 0 < len(generated) <= ID_LIMIT:
            await store.call(Store.set, since_key, generated)
        return count, not since

    async def _load_all_positions(self, store: StoreThread, lst: dict[str, Any]) -> tuple[int, str | None]:
        """Every order into a new list file, downloaded and written by a child process.

        In the daemon's process the 2,000 pages of 100,000 tickets held the interpreter lock in long
        stretches (parsing, making rows) and every scan meanwhile waited for it (gated.reload says
        more; figures in benchmarks/README.md, "pretix").
        """
        result = await reload.run_in_child({"config": self.config, "state": {"token": self.token, "list": lst},
                                            "store": str(store.store.path)})
        self.last_reload = result
        return result["tickets"], result["generated"]

    def restore_state(self, state: dict[str, Any]) -> None:
        """In the reload process: the daemon's device token and the check-in list's settings."""
        self.token, self._reload_list = state["token"], state["list"]

    async def reload_here(self, store: StoreThread) -> dict[str, Any]:
        """In the reload process: every order, streamed page by page into a new list file."""
        try:
            count, generated = await self._stream_positions(store, self._reload_list)
        except (AttributeError, TypeError, KeyError, ValueError) as e:
            raise _unexpected_shape(e) from None
        return {"tickets": count, "generated": generated, "peak_rss_mb": reload.peak_rss_mb(),
                "written_mb": reload.written_mb(), "pid": os.getpid()}

    async def _stream_positions(self, store: StoreThread, lst: dict[str, Any]) -> tuple[int, str | None]:
        """Rows made on the store thread as pages arrive (Store.load_tickets takes them one by one),
        the next page fetched on the event loop meanwhile: one or two pages of 50 orders in memory."""
        loop = asyncio.get_running_loop()
        seen: dict[str, Any] = {"rows": 0, "generated": None}

        def fetch(page: str, params: dict[str, Any] | None) -> concurrent.futures.Future:
            return asyncio.run_coroutine_threadsafe(self._get_page(page, params, "orders"), loop)

        def rows() -> Iterator[dict[str, Any]]:
            # An error of a page ends the load, which leaves the list in use as it was.
            coming: concurrent.futures.Future | None = fetch(f"{self.event_path}/orders/", {})
            first = True
            try:
                while coming is not None:
                    found, nxt, generated = coming.result()
                    if first:
                        seen["generated"], first = generated, False
                    coming = fetch(nxt, None) if nxt else None
                    # An httpx Response and its stream refer to each other: freed now, not at a full collection.
                    gc.collect(1)
                    for order in found:
                        out = _position_rows(order, self.list_id, lst)
                        seen["rows"] += len(out)
                        yield from out
            finally:
                if coming is not None:
                    coming.cancel()

        await store.call(Store.load_tickets, self.positions_name, rows())
        return seen["rows"], seen["generated"]

    async def _get_json(self, path: str, what: str, params: dict[str, Any] | None = None) -> Any:
        response = await self._call("GET", path, params=params, timeout=SLOW_CALL_SECONDS, limit=LIST_PAGE_LIMIT)
        if response.status_code != 200:
            raise BackendRejected(f"{what}: HTTP {response.status_code}")
        return await json_answer(response)

    async def _get_all(self, path: str, params: dict[str, Any], what: str,
                       each: Callable[[Any], list[Any]] | None = None) -> tuple[list[Any], str | None]:
        """Every page of a list resource, and the first page's X-Page-Generated (the next delta's start).

        `each(result)`, when given, turns each result into the rows kept, page by page, so a download
        of many orders never holds more than one page of pretix's full answer.
        """
        results: list[Any] = []
        found, page, generated = await self._get_page(path, params, what)
        while True:
            results += [row for r in found for row in each(r)] if each else found
            if not page:
                return results, generated
            found, page, _ = await self._get_page(page, None, what)

    async def _get_page(self, path: str, params: dict[str, Any] | None,
                        what: str) -> tuple[list[Any], str | None, str | None]:
        """One page of a list resource: (its results, the next page's path or None, X-Page-Generated)."""
        response = await self._call("GET", path, params=params, timeout=SLOW_CALL_SECONDS, limit=LIST_PAGE_LIMIT)
        if response.status_code != 200:
            raise (NotFound if response.status_code == 404 else BackendRejected)(f"{what}: HTTP {response.status_code}")
        generated = response.headers.get("X-Page-Generated")
        body = await json_answer(response)
        found = body.get("results") if isinstance(body, dict) else None
        nxt = body.get("next") if isinstance(body, dict) else None
        if not isinstance(found, list) or not (nxt is None or isinstance(nxt, str)):
            raise Unreachable(f"{what}: a page without pretix's results and next")
        # `next` is absolute and may name the host as pretix sees itself behind a proxy: keep our
        # own base URL and follow only the path and query.
        page = (urlsplit(nxt).path + ("?" + urlsplit(nxt).query if urlsplit(nxt).query else "")) if nxt else None
        return found, page, generated

    async def _sync_secrets(self, store: StoreThread, resource: str, stamp: str, table: str) -> int:
        since_key = f"pretix:{self.scope}:{resource}_since"
        since = await store.call(Store.get, since_key) if await store.call(Store.list_usable, table) else None
        params = {"ordering": f"-{stamp}"}
        if since:
            params[f"{stamp}_since"] = since
        results, generated = await self._get_all(f"{self.event_path}/{resource}/", params, resource)
        # A secret that is not text of a ticket's length can never match a scan: such rows are skipped.
        rows = [{"token": r["secret"], "ticket_key": r["secret"],
                 "status": "blocked" if r.get("blocked", True) else "unblocked"} for r in results
                if isinstance(r, dict) and isinstance(r.get("secret"), str) and 0 < len(r["secret"]) <= MAX_SECRET]
        if since:
            await store.call(Store.upsert_tickets, table, rows)
        else:
            await store.call(Store.load_tickets, table, rows)
        newest = generated or (results[0].get(stamp) if results and isinstance(results[0], dict) else None)
        if isinstance(newest, str) and newest and len(newest) <= ID_LIMIT:
            await store.call(Store.set, since_key, newest)
        return len(rows)

    def data_age(self, store: Store, now: float) -> float | None:
        data = store.get_data(self.offline_name)
        if data is None or not (data[0].get("keys") or data[0].get("positions")):
            return None  # nothing to check a secret against: the configured fallback decides
        return max(0.0, now - data[1])

    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        data = store.get_data(self.offline_name)
        if data is None:
            return deny(Reason.OFFLINE_NO_DATA, backend=self.name, message="no pretix offline data downloaded yet")
        value, updated = data
        if self._keys[0] != updated:
            self._keys = (updated, load_sig1_keys(value.get("keys") or []))
        check = verify_sig1(scan.token, self._keys[1])
        signed = check.reason is Reason.OK
        # A changed or canceled ticket gets a new secret and the old one is revoked: pretix looks for
        # a current secret first, and a revoked one is never current, so this order answers the same.
        if store.ticket(self.revoked_name, scan.token) is not None:
            return deny(Reason.REVOKED, backend=self.name, backend_code="revoked",
                        message="secret replaced or canceled in pretix")
        lst = value.get("list") or {}
        row = store.ticket(self.positions_name, scan.token) if value.get("positions") else None
        # Not a ticket's secret: perhaps a reusable medium's barcode (pretix looks for media second).
        # A card's text may look like a damaged signed secret (1 in 100 of pretix's card codes do),
        # so a failed signature check speaks only when neither is found.
        medium = (store.ticket(self.media_name, scan.token) if row is None and not signed and value.get("media")
                  else None)
        if row is None and medium is None and check.reason not in (Reason.OK, Reason.UNKNOWN):
            return deny(check.reason, backend=self.name, message=check.detail)
        key = scan.token
        if medium is not None:
            # The ticket a card stands for is decided by pretix's checks, canceled or not (pretix
            # finds a card's tickets whatever their state): no "not found" for it below.
            row = self._medium(store, medium, lst, now, clock_trusted)
            if isinstance(row, Decision):
                return row
            return self._decide(store, row["token"], scan_mode, now, clock_trusted, _Ticket.from_row(row), value)
        if row is not None and lst.get("addon_match"):
            row = self._addon_match(store, row, lst, now, clock_trusted)
            if isinstance(row, Decision):
                return row
            key = row["token"]
        if row is not None and row["status"] == GONE:
            # Canceled on its own (the order stays paid), or of another date than the list's: never
            # admitted, whatever its signature says.
            facts = json.loads(row["data"] or "{}")
            if lst.get("subevent") and facts.get("subevent") != lst["subevent"]:
                return deny(Reason.WRONG_EVENT, backend=self.name, backend_code="invalid",
                            message=f"date {facts.get('subevent')}, list is for {lst['subevent']}")
            return deny(Reason.UNKNOWN, backend=self.name, backend_code="invalid",
                        message="not a ticket of this event any more")
        if row is not None:
            ticket = _Ticket.from_row(row)
        elif signed:
            # Signed, and not (yet) in the download: the signed payload's facts, paid as far as known.
            t = check.ticket
            if lst.get("subevent") and t.subevent != lst["subevent"]:
                return deny(Reason.WRONG_EVENT, backend=self.name, backend_code="invalid",
                            message=f"date {t.subevent}, list is for {lst['subevent']}")
            blocked = store.ticket(self.blocked_name, scan.token)
            ticket = _Ticket(item=t.item, variation=t.variation or None, subevent=t.subevent or None,
                             blocked=blocked is not None and blocked["status"] == "blocked",
                             valid_from=t.valid_from, valid_until=t.valid_until)
        else:
            why = "not a ticket of this event" if value.get("positions") else check.detail
            return deny(Reason.UNKNOWN, backend=self.name, backend_code="invalid", message=why)
        return self._decide(store, key, scan_mode, now, clock_trusted, ticket, value)

    def _addon_match(self, store: Store, row: dict[str, Any], lst: dict[str, Any], now: float,
                     clock_trusted: bool) -> dict[str, Any] | Decision:
        """The row pretix would check in for a scanned ticket on an `addon_match` list, or `ambiguous`:
        of the ticket and its add-ons not canceled, the one `_choose` takes."""
        secrets = json.loads(row["data"]).get("addons", ())
        if len(secrets) > ADDONS_LIMIT:
            return self._ambiguous(row["name"], f"more than {ADDONS_LIMIT} add-ons: not decided offline")
        addons = self._live(store, secrets)
        if not addons:
            return row
        every = ([row] if row["status"] != GONE else []) + addons
        return self._choose(every, lst, now, clock_trusted, row["name"])

    def _medium(self, store: Store, medium: dict[str, Any], lst: dict[str, Any], now: float,
                clock_trusted: bool) -> dict[str, Any] | Decision:
        """The row pretix would check in for a scanned reusable medium (a card whose barcode pretix
        links to tickets), or why none: inactive or expired (by a trusted clock), linked to no ticket
        of this event (as pretix says it: `invalid`), or `ambiguous`. Its linked tickets, canceled and
        other dates included as pretix finds them (and their add-ons on an `addon_match` list), are
        the candidates of `_choose`; a secret replaced since (revoked) is none of them."""
        data = json.loads(medium["data"])
        expires = data.get("expires")
        if medium["status"] != "active" or (clock_trusted and expires is not None and expires < now):
            return deny(Reason.UNKNOWN, backend=self.name, backend_code="invalid", event_id=self.event,
                        message="reusable medium not active in pretix" if medium["status"] != "active"
                        else f"reusable medium expired {iso(expires)}")
        linked = self._rows(store, data.get("secrets", ()))
        every = list(linked)
        if lst.get("addon_match"):
            for row in linked:
                every += self._rows(store, json.loads(row["data"]).get("addons", ()))
        if len(every) > ADDONS_LIMIT or len(data.get("secrets", ())) > ADDONS_LIMIT:
            return self._ambiguous("", f"more than {ADDONS_LIMIT} tickets on this medium: not decided offline")
        if not linked:
            return deny(Reason.UNKNOWN, backend=self.name, backend_code="invalid", event_id=self.event,
                        message="Medium connected to other event")
        return every[0] if len(every) == 1 else self._choose(every, lst, now, clock_trusted, linked[0]["name"])

    def _rows(self, store: Store, secrets: Sequence[str]) -> list[dict[str, Any]]:
        """The downloaded tickets of these secrets (at most ADDONS_LIMIT + 1 looked up), a revoked one left out."""
        found = (store.ticket(self.positions_name, s) for s in secrets[:ADDONS_LIMIT + 1]
                 if store.ticket(self.revoked_name, s) is None)
        return [r for r in found if r is not None]

    def _live(self, store: Store, secrets: Sequence[str]) -> list[dict[str, Any]]:
        """The downloaded tickets of these secrets that pretix would find (not canceled, this date)."""
        found = (store.ticket(self.positions_name, s) for s in secrets)
        return [r for r in found if r is not None and r["status"] != GONE]

    def _choose(self, every: list[dict[str, Any]], lst: dict[str, Any], now: float, clock_trusted: bool,
                name: str | None) -> dict[str, Any] | Decision:
        """pretix's redeem (2026.8.0, step 3) when a code matches several tickets: those of a product
        on the list, then those valid now; one left is the one; none left, the one that is valid next,
        or was valid last, or the first, is decided (and refused by the checks); several left,
        `ambiguous`, before any other check. Without a trusted clock "valid now" is not known: several
        of a product on the list are `ambiguous`."""
        facts = [(r, json.loads(r["data"])) for r in every]
        left = [(r, d) for r, d in facts
                if lst.get("all_products", True) or d["item"] in (lst.get("limit_products") or [])]
        if len(left) > 1 and clock_trusted:
            left = [(r, d) for r, d in left
                    if (d["from"] is None or d["from"] <= now) and (d["until"] is None or d["until"] > now)]
        if len(left) == 1:
            return left[0][0]
        if len(left) > 1:
            return self._ambiguous(name, f"{len(left)} tickets match the code (on this list)")
        upcoming = [(d["from"], r) for r, d in facts if d["from"] is not None and d["from"] > now]
        if upcoming:
            return min(upcoming, key=lambda x: x[0])[1]
        past = [(d["until"], r) for r, d in facts if d["until"] is not None and d["until"] < now]
        if past:
            return max(past, key=lambda x: x[0])[1]
        return every[0]

    def _ambiguous(self, name: str | None, why: str) -> Decision:
        return deny(Reason.AMBIGUOUS, backend=self.name, backend_code="ambiguous", event_id=self.event,
                    message=cut(f"{name}: {why}") if name else why)

    def _decide(self, store: Store, key: str, scan_mode: ScanMode, now: float, clock_trusted: bool,
                t: _Ticket, value: dict[str, Any]) -> Decision:
        """pretix's checks in pretix's order (`perform_checkin` of pretix 2026.8.0), with its reason codes.

        `key` is the secret of the ticket checked in: the scanned one, or its add-on (`_addon_match`).
        Validity windows and rules apply to entries only; an exit is refused only for the order's
        state, a block or the product, as in pretix.
        """
        lst = value.get("list") or {}
        entry = scan_mode is ScanMode.ENTRY

        def no(reason: Reason, code: str, why: str = "") -> Decision:
            message = cut(f"{t.name}: {why}") if t.name and why else (why or t.name)
            return deny(reason, backend=self.name, backend_code=code, event_id=self.event, message=message)

        if t.order not in ("p", "n") or t.canceled:
            return no(Reason.CANCELED, "canceled", "order canceled" if t.order not in ("p", "n") else "ticket canceled")
        if t.blocked:
            return no(Reason.BLOCKED, "blocked", "blocked in pretix")
        if t.order == "n" and t.approval:
            return no(Reason.NOT_APPROVED, "unapproved", "order not approved yet")
        if entry and clock_trusted and t.valid_from is not None and t.valid_from > now:
            return no(Reason.NOT_YET_VALID, "invalid_time", f"valid from {iso(t.valid_from)}")
        if entry and clock_trusted and t.valid_until is not None and t.valid_until < now:
            return no(Reason.EXPIRED, "invalid_time", f"valid until {iso(t.valid_until)}")
        if not lst.get("all_products", True) and t.item not in (lst.get("limit_products") or []):
            return no(Reason.PRODUCT_NOT_ALLOWED, "product", f"product {t.item} not on this list")
        if lst.get("subevent") and t.subevent != lst["subevent"]:
            return no(Reason.WRONG_EVENT, "product", f"date {t.subevent}, list is for {lst['subevent']}")
        # gated sends ignore_unpaid: false online (a turnstile cannot ask whether to let an unpaid
        # ticket in, as pretixSCAN asks its operator), so a pending order is unpaid on every list.
        if t.order != "p" and not t.pending_ok:
            return no(Reason.NOT_PAID, "unpaid", "order not paid")
        checkins = _merge_checkins(t.checkins, store.admission_times(key))
        if entry and lst.get("rules"):
            zone = ZoneInfo(value.get("timezone") or "UTC")
            # A date of a series has its own times: a rule on a date not downloaded fails to evaluate
            # (a denial), rather than compare against the series' own times.
            dates = {k: _moment(v) for k, v in (self._date_times(store, t.subevent) if t.subevent
                                                else value.get("dates") or {}).items()}
            result = evaluate(lst["rules"], Facts(
                now=datetime.fromtimestamp(now, UTC), timezone=zone, product=t.item, variation=t.variation,
                gate=value.get("gate"), list_id=self.list_id,
                checkins=[CheckIn(at=_moment(at), type=kind) for at, kind in checkins],
                date_from=dates.get("date_from"), date_to=dates.get("date_to"),
                date_admission=dates.get("date_admission")))
            if not result.allowed:
                return no(Reason.RULES, "rules", result.explanation or "")
        if entry and self.config.offline.antipassback and not _entry_allowed(checkins, lst):
            return no(Reason.ALREADY_USED, "already_redeemed")
        # Entries already made were counted here, the server's with this lane's: the decider's own
        # count (this lane's alone) would only repeat it.
        return admit(Reason.OK, backend=self.name, backend_code="ok", ticket_key=key, event_id=self.event,
                     max_entries=MANY, message=t.name or f"product {t.item}")

    def _date_times(self, store: Store, subevent: int) -> dict[str, float | None]:
        row = store.ticket(self.dates_name, str(subevent))
        return json.loads(row["data"]) if row is not None else {}

    # --- upload and annulment ------------------------------------------------------------

    async def upload(self, rows: list[dict[str, Any]]) -> UploadResult:
        """Replay offline check-ins: original time, same nonce, `force` (they happened either way)."""
        async def send(row: dict[str, Any]) -> str | None:
            body = self._redeem_body(row["token"], row["scan_mode"], row["nonce"])
            body |= {"force": True, "datetime": iso(row["wall"])}
            response = await self._call("POST", f"{self.org_path}/checkinrpc/redeem/", json=body,
                                        timeout=SLOW_CALL_SECONDS)
            return _upload_refusal(response)

        # Refused scans and check-ins nobody passed through have nothing to report.
        return await self.replay(rows, lambda r: r["verdict"] == "admit" and r["passed"] != 0 and bool(r["token"]),
                                 send)

    async def not_passed(self, row: dict[str, Any]) -> None:
        if row["source"] == "mode" or (row["source"] == "offline" and row["upload"] == "pending"):
            return  # free passage made no check-in; an offline one is not on the server yet (never will be)
        body = {"nonce": row["nonce"], "lists": [self.list_id], "datetime": iso(time.time()),
                "error_explanation": "Turnstile did not turn"}
        response = await self._call("POST", f"{self.org_path}/checkinrpc/annul/", json=body)
        if response.status_code != 200:
            raise BackendRejected(f"pretix did not annul the check-in (HTTP {response.status_code})")


# --- offline tickets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ticket:
    """What pretix knows of a ticket when it decides a scan (one row of the positions list file)."""

    item: int
    variation: int | None = None
    subevent: int | None = None
    order: str = "p"  # the order's status: n pending, p paid, e expired, c canceled
    pending_ok: bool = False  # the order's `valid_if_pending`
    approval: bool = False  # the order's `require_approval`
    blocked: bool = False
    canceled: bool = False  # this ticket alone (reached through a card: pretix finds it, then refuses it)
    valid_from: float | None = None
    valid_until: float | None = None
    checkins: Sequence[tuple[float, str]] = ()  # (time, entry|exit): successful ones on this list
    name: str = ""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> _Ticket:
        d = json.loads(row["data"])
        return cls(item=d["item"], variation=d["variation"], subevent=d["subevent"], order=d["order"],
                   pending_ok=d["pending_ok"], approval=d["approval"], blocked=d["blocked"],
                   canceled=d.get("canceled", False),
                   valid_from=d["from"], valid_until=d["until"], checkins=[tuple(c) for c in d["checkins"]],
                   name=row["name"] or "")


def _position_rows(order: Any, list_id: int, lst: dict[str, Any]) -> list[dict[str, Any]]:
    """The list-file rows of one order of `orders/`; a ticket not in pretix's shape costs only itself."""
    if not isinstance(order, dict) or order.get("status") not in ("n", "p", "e", "c"):
        return []
    rows = []
    positions = order.get("positions") or []
    addons: dict[int, list[str]] = {}  # a ticket's id -> its add-ons' secrets (pretix's addon_match)
    for p in positions:
        if isinstance(p, dict) and isinstance(p.get("addon_to"), int) and isinstance(p.get("secret"), str):
            addons.setdefault(p["addon_to"], []).append(p["secret"])
    for p in positions:
        try:
            rows.append(_position_row(p, order, list_id, lst, addons))
        except (Unreachable, ValueError, TypeError, AttributeError) as e:
            log.debug("pretix order %s: a ticket left out (%s)", cut(str(order.get("code")), ID_LIMIT), e)
    return rows


def _position_row(p: Any, order: dict[str, Any], list_id: int, lst: dict[str, Any],
                  addons: dict[int, list[str]]) -> dict[str, Any]:
    p = mapping(p, "position")
    secret = p.get("secret")
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET:
        raise ValueError("no secret a scan could match")
    subevent = integer(p.get("subevent"), "subevent")
    checkins = []
    for c in p.get("checkins") or []:
        c = mapping(c, "check-in")
        if c.get("list") == list_id:  # the rules and "already used" count this list's only
            at = parse_time(c.get("datetime"))
            if at is not None:
                checkins.append((at, "exit" if c.get("type") == "exit" else "entry"))
    # pretix does not find a ticket canceled on its own, nor one of another date than the list's.
    gone = p.get("canceled") is True or bool(lst.get("subevent") and subevent != lst["subevent"])
    data = {"item": integer(p.get("item"), "item"), "variation": integer(p.get("variation"), "variation"),
            "subevent": subevent, "order": order["status"], "pending_ok": order.get("valid_if_pending") is True,
            "approval": order.get("require_approval") is True, "blocked": bool(p.get("blocked")),
            "from": parse_time(p.get("valid_from")), "until": parse_time(p.get("valid_until")),
            "checkins": sorted(checkins), "canceled": p.get("canceled") is True}
    if data["item"] is None:
        raise ValueError("no product")
    if isinstance(p.get("id"), int) and p["id"] in addons:
        data["addons"] = [s for s in addons[p["id"]] if 0 < len(s) <= MAX_SECRET][:ADDONS_LIMIT + 1]
    return {"token": secret, "ticket_key": secret, "name": text(p.get("attendee_name"), "attendee_name"),
            "status": GONE if gone else order["status"], "data": data}


def _medium_rows(medium: Any, event: str) -> list[dict[str, Any]]:
    """The list-file row of one reusable medium: its identifier, whether it is active, when it
    expires and the secrets of its tickets of `event`; nothing for a medium not in pretix's shape."""
    if not isinstance(medium, dict):
        return []
    m, identifier = medium, medium.get("identifier")
    if not isinstance(identifier, str) or not 0 < len(identifier) <= MAX_SECRET:
        return []
    try:
        secrets = []
        linked = m.get("linked_orderpositions") or []
        for p in linked if isinstance(linked, list) else []:
            # Expanded, a ticket of this event; an id alone (pretix hides tickets of events the
            # device may not read) cannot be checked in here.
            order = p.get("order") if isinstance(p, dict) else None
            secret = p.get("secret") if isinstance(p, dict) else None
            if (isinstance(order, dict) and order.get("event") == event and isinstance(secret, str)
                    and 0 < len(secret) <= MAX_SECRET):
                secrets.append(secret)
        data = {"secrets": secrets[:ADDONS_LIMIT + 1], "expires": parse_time(m.get("expires"))}
    except (Unreachable, ValueError, TypeError):
        # Named, but otherwise unreadable: never active offline (it may be a card just deactivated).
        return [{"token": identifier, "ticket_key": identifier, "name": "", "status": "inactive",
                 "data": {"secrets": [], "expires": None}}]
    return [{"token": identifier, "ticket_key": identifier, "name": "",
             "status": "active" if m.get("active") is True else "inactive", "data": data}]


def _list_settings(lst: dict[str, Any]) -> dict[str, Any]:
    """What offline decisions use of a check-in list, each checked: a value of the wrong type (a
    string for a flag, a product list that is not one) fails the sync, not every scan after it."""
    def flag(key: str, default: bool) -> bool:
        value = lst.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise Unreachable(f"check-in list {key} is a {type(value).__name__}, not true or false")
        return value

    products = lst.get("limit_products")
    if products is not None and not isinstance(products, list):
        raise Unreachable(f"check-in list limit_products is a {type(products).__name__}, not a list")
    return {"id": lst.get("id"), "name": text(lst.get("name"), "check-in list name"),
            "all_products": flag("all_products", True),
            "limit_products": [integer(p, "check-in list product") for p in products or []],
            "subevent": integer(lst.get("subevent"), "check-in list date", low=1),
            "allow_multiple_entries": flag("allow_multiple_entries", False),
            "allow_entry_after_exit": flag("allow_entry_after_exit", True),
            "include_pending": flag("include_pending", False), "addon_match": flag("addon_match", False),
            "rules": mapping(lst.get("rules"), "check-in list rules")}


def _date_rows(subevent: Any) -> list[dict[str, Any]]:
    """The list-file row of one date of a series: its id and times; nothing for a date not in pretix's shape."""
    try:
        d = mapping(subevent, "date")
        number = integer(d.get("id"), "date id")
        times = {k: parse_time(d.get(k)) for k in ("date_from", "date_to", "date_admission")}
    except (Unreachable, ValueError):
        return []
    if number is None:
        return []
    return [{"token": str(number), "ticket_key": str(number), "name": "", "status": "date", "data": times}]


def _merge_checkins(server: Sequence[tuple[float, str]],
                    lane: Sequence[tuple[float, str]]) -> list[tuple[float, str]]:
    """The server's check-ins and the lane's admissions it does not hold yet, oldest first.

    A lane admission that reached pretix (online, or uploaded since) is in the download too: it is
    the server check-in of the same direction within SAME_CHECKIN_SECONDS, each matched once.
    """
    left = list(server)
    merged = list(server)
    for at, kind in lane:
        match = next((c for c in left if c[1] == kind and abs(c[0] - at) <= SAME_CHECKIN_SECONDS), None)
        if match is not None:
            left.remove(match)
        else:
            merged.append((at, kind))
    return sorted(merged)


def _entry_allowed(checkins: Sequence[tuple[float, str]], lst: dict[str, Any]) -> bool:
    """pretix's `entry_allowed` for an entry: never in, last seen leaving (on such a list), or many allowed."""
    return bool(lst.get("allow_multiple_entries") or all(kind == "exit" for _, kind in checkins)
                or (lst.get("allow_entry_after_exit") and checkins[-1][1] == "exit"))


def _moment(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _redeem_fields(body: dict[str, Any]) -> tuple[dict[str, Any], str, str | None]:
    """(position, who, event id) of a redeem answer, each checked: a wrong type means this is not pretix's answer."""
    position = mapping(body.get("position"), "redeem position")
    lst = mapping(body.get("list"), "redeem list")
    who = text(position.get("attendee_name"), "attendee_name") or ident(position.get("order"), "position order")
    return position, who or "", ident(lst.get("event"), "list event")


def _upload_refusal(response: httpx.Response) -> str | None:
    """None when pretix now holds the check-in (a nonce it already had counts), else why it never will.

    Unreachable when the answer is not pretix's (JSON of another shape): the scan is sent again later.
    """
    try:
        body = json_body(response)
    except Unreachable:
        return f"HTTP {response.status_code} without JSON"
    if isinstance(body, dict) and body.get("status") in ("ok", "error"):
        _redeem_fields(body)
    status = body.get("status") if isinstance(body, dict) else None
    if status == "ok" or (status == "error" and body.get("reason") == "already_redeemed"):
        return None
    if status == "error":
        # Stored with the parked scan and logged: the server's words, cut, as text whatever their type.
        why = f"{cut(str(body.get('reason')), ID_LIMIT)} ({cut(str(body.get('reason_explanation') or ''))})"
        return f"pretix refused it even with force: {why}"
    return f"HTTP {response.status_code}: {error_text(response, _words, body)}"


def _unexpected_shape(e: Exception) -> BackendRejected:
    return BackendRejected(f"pretix answered in an unexpected shape ({type(e).__name__}: {str(e)[:80]})")


def _words(body: Any) -> str:
    """pretix's answer as text for a log or queue line (`error_text` cuts it), without the position or
    the secret: the position echoes the scanned secret, which must not reach a log."""
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in ("position", "secret")}
    return str(body)


def _field_errors(body: Any) -> str:
    """pretix's refusal of a request, as its field errors read ({"token": ["... already been used."]})."""
    if not isinstance(body, dict):
        return str(body)
    return "; ".join(f"{k}: {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in body.items())


def _time_side(position: dict[str, Any], now: float) -> Reason:
    """pretix says `invalid_time` for both sides of a validity window; the position says which."""
    try:
        start, end = parse_time(position.get("valid_from")), parse_time(position.get("valid_until"))
    except ValueError:
        return Reason.INVALID_TIME
    if start is not None and now < start:
        return Reason.NOT_YET_VALID
    if end is not None and now > end:
        return Reason.EXPIRED
    return Reason.INVALID_TIME


def _setup_token(text: str, configured_url: str) -> str:
    """The setup token, typed as is or as the setup QR's JSON {"handshake_version", "url", "token"}."""
    text = text.strip()
    if not text.startswith("{"):
        if not text:
            raise BackendRejected("the setup token is empty")
        return text
    try:
        qr = json.loads(text)
    except ValueError:
        raise BackendRejected("the setup QR text is not valid JSON") from None
    if not isinstance(qr, dict) or not qr.get("token"):
        raise BackendRejected("the setup QR text holds no token")
    version = qr.get("handshake_version", 1)
    if not isinstance(version, int) or version > HANDSHAKE_VERSION:
        raise BackendRejected(f"the setup QR uses handshake version {version}; this gated knows "
                              f"{HANDSHAKE_VERSION}: update gated")
    url = str(qr.get("url") or "").rstrip("/")
    if url and url != configured_url.rstrip("/"):
        raise BackendRejected(f"the setup QR is for {url} but [backend] url is {configured_url}: "
                              "set [backend] url to it first")
    return str(qr["token"])


def _text(value: Any) -> str:
    """A pretix multi-lingual string ({"en": ...}) or plain text."""
    if isinstance(value, dict):
        return str(next(iter(value.values()), ""))
    return str(value or "")


def create(config: Config) -> Backend:
    return PretixBackend(config)
