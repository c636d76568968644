"""A pretix server on 127.0.0.1 for tests and benches: the device API gated uses, and the legacy pretixdroid API.

`PretixSim` serves device initialisation and `device/info`, `checkinrpc/redeem|annul|search`, the
event (with `valid_keys`, time zone and dates), check-in lists, the list's positions, orders (with
`modified_since`), and revoked/blocked secrets, with pretix's auth (`Device <token>`, 401/403),
pagination (`next` links, `X-Page-Generated`), nonce idempotency (the same nonce answers the first
result again and stores nothing new), 201 for a check-in and 400/404 with `reason` for a refusal.
Signed secrets are made the way pretix's Sig1TicketSecretGenerator makes them. `PretixdroidSim`
serves `/pretixdroid/api/...` as its spec says: `?key=`, form field `secret`, HTTP 200 with
`status`/`reason`, 403 and 404 for bad key/event.

Where the real pretix (2026.8.0, run by tests/realpretix.py) differs from its documents, this
simulator follows the real server:
- redeem checks in `perform_checkin`'s order: canceled, blocked, not approved, validity (entries),
  product, unpaid, rules (entries), already redeemed; `force` passes all of them; a ticket of
  another date than the list's is not found (`invalid`, 404), as one canceled on its own;
- a canceled order answers `unpaid` unless the scanner sends `canceled_supported` (not checked
  against the real server); canceling an order of signed tickets gives its tickets new secrets and
  revokes the old ones (`revoked`). Real pretix does this for every secret of an event whose
  generator signs, random ones of our choosing included (tests/test_real_pretix_offline.py); this
  simulator revokes signed secrets only;
- a pending order passes on an `include_pending` list only with `ignore_unpaid: true`, or when the
  order is `valid_if_pending`;
- `checkinlists/{id}/positions/` carries `order__status`, `order__valid_if_pending`,
  `order__require_approval`, `blocked`, validity and the list's check-ins, leaves out canceled orders
  unless `ignore_status=true` and other products' tickets always, and ignores `modified_since`;
  `orders/` honours `modified_since`, and a check-in or annulment changes its order;
- a device of the `pretixscan` security profile gets 403 "Request denied by device security
  profile." on a single list's detail and on `orderpositions/`;
- `validFromUnixTime` / `validUntilUnixTime` are written as 0 on tickets without a window;
- `valid_keys["pretix_sig1"]` is empty on a real event that never made a signed secret; this
  simulator always offers its key (it makes signed and random secrets side by side).

Not simulated: orders of several tickets, add-ons and `addon_match` (tested against the real server
only, tests/test_real_pretix_offline.py), questions, series; of reusable media only barcode cards,
each standing for its first ticket.

Long because it serves two APIs (the device API and the legacy pretixdroid API) over one set of
events, orders and check-ins, so a test can move between them.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import secrets
import struct
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gated.simulators.base import Request, Response, Simulator, route


class _QuickStop(Simulator):
    def start(self) -> Simulator:
        # Poll for shutdown every 20 ms rather than the default 0.5 s: tests stop many servers.
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

SERVER_TZ = timezone(timedelta(hours=1))  # a datetime sent without offset is read in the server's zone
ANNUL_WINDOW = timedelta(minutes=15)
DENIED_BY_PROFILE = {"detail": "Request denied by device security profile."}


# --- pretix_sig1, as pretix makes it ---------------------------------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_ticket(seed: str, item: int, variation: int = 0, subevent: int = 0,
                  valid_from: int | None = None, valid_until: int | None = None) -> bytes:
    """proto3 `Ticket` as pretix writes it: default scalars are left out, and the validity fields are
    always written, as 0 when the position has no window (pretix's `_encode_time(None)`; the payload of
    a real pretix 2026.8.0 ticket ends `28 00 30 00`)."""
    out = b""
    if seed:
        raw = seed.encode()
        out += b"\x0a" + _varint(len(raw)) + raw
    for number, value in ((2, item), (3, variation), (4, subevent)):
        if value:
            out += _varint(number << 3) + _varint(value)
    for number, value in ((5, valid_from), (6, valid_until)):
        out += _varint(number << 3) + _varint(value or 0)
    return out


def sign_secret(key: Ed25519PrivateKey, payload: bytes) -> str:
    raw = b"\x01" + struct.pack(">H", len(payload)) + struct.pack(">H", 64) + payload + key.sign(payload)
    return base64.b64encode(raw).decode()[::-1]


def make_sig1_secret(key: Ed25519PrivateKey, item: int, variation: int = 0, subevent: int = 0, *,
                     valid_from: int | None = None, valid_until: int | None = None, seed: str | None = None) -> str:
    seed = seed or secrets.token_urlsafe(7)[:9]
    return sign_secret(key, encode_ticket(seed, item, variation, subevent, valid_from, valid_until))


def sig1_public_key(key: Ed25519PrivateKey) -> str:
    """How `valid_keys["pretix_sig1"]` lists a key: base64 of the PEM SubjectPublicKeyInfo."""
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(pem).decode()


def generated_secret(index: int) -> str:
    """The `index`-th random secret of `PretixSim.add_positions`: pretix's default secret shape (32 of
    its letters and digits), made from the index so a bench can scan a ticket without asking for it."""
    digest = hashlib.blake2b(index.to_bytes(8, "big"), digest_size=32).digest()
    return "".join(_SECRET_LETTERS[b % len(_SECRET_LETTERS)] for b in digest)


_SECRET_LETTERS = "abcdefghjkmnpqrstuvwxyz23456789"


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _signed(secret: str) -> bool:
    try:
        return base64.b64decode(secret[::-1], validate=True)[:1] == b"\x01"
    except ValueError:
        return False


def _parse(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=SERVER_TZ)


# --- the device API ----------------------------------------------------------------------------


@dataclass
class Position:
    id: int
    order: str
    item: int
    secret: str
    attendee_name: str = ""
    variation: int | None = None
    subevent: int | None = None
    order_status: str = "p"  # n pending, p paid, e expired, c canceled
    require_approval: bool = False
    valid_if_pending: bool = False
    blocked: bool = False
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    require_attention: bool = False
    canceled: bool = False  # this ticket alone canceled (the order stays)
    modified: datetime = field(default_factory=lambda: datetime.now(UTC))  # the order's last_modified


@dataclass
class Checkin:
    id: int
    nonce: str | None
    position: int | None
    list: int
    type: str
    datetime: datetime
    device: int
    successful: bool = True
    error_reason: str | None = None
    forced: bool = False
    raw_secret: str = ""
    error_explanation: str | None = None


@dataclass
class Device:
    device_id: int
    name: str
    token: str | None = None
    initialized: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    gate: int | None = None


class PretixSim(_QuickStop):
    def __init__(self, organizer: str = "demo", event: str = "democon", *, page_size: int = 50, **kw):
        super().__init__(**kw)
        self.organizer, self.event = organizer, event
        self.page_size = page_size
        self.key = Ed25519PrivateKey.generate()
        self.valid_keys = [sig1_public_key(self.key)]
        self.lists: dict[int, dict[str, Any]] = {1: {
            "id": 1, "name": "Main entrance", "all_products": True, "limit_products": [], "subevent": None,
            "include_pending": False, "allow_multiple_entries": False, "allow_entry_after_exit": True,
            "rules": {}}}
        self.positions: dict[str, Position] = {}
        self.revoked: list[dict[str, Any]] = []  # {"id", "secret", "created", "_position"}
        self.blocked: list[dict[str, Any]] = []  # {"id", "secret", "blocked", "updated"}
        self.media: list[dict[str, Any]] = []  # reusable media: {"id", "identifier", "active", "expires", ...}
        self.setup_tokens: dict[str, Device] = {}
        self.checkins: list[Checkin] = []
        self.answers: dict[str, Response] = {}  # nonce -> first answer
        self.public_url: str | None = None  # the host pretix names in `next` links (behind a proxy)
        self.timezone = "Europe/Berlin"
        self.date_from = "2026-06-01T17:00:00Z"
        self._ids = itertools.count(1)
        self._orders_snapshot: tuple[Any, list[Position]] | None = None  # see orders()

    # --- test helpers ---------------------------------------------------------------------

    def new_device(self, name: str = "Gate 1") -> str:
        """A device created in the organizer settings; returns its single-use setup token."""
        token = secrets.token_hex(8)
        self.setup_tokens[token] = Device(next(self._ids), name)
        return token

    def device_token(self, name: str = "Gate 1") -> str:
        """A device already initialised (as by another client): its API token, for a token_file."""
        device = Device(next(self._ids), name, secrets.token_hex(32), True)
        self.setup_tokens[secrets.token_hex(8)] = device
        return device.token

    def add_position(self, item: int = 1, attendee_name: str = "Ada Lovelace", *, signed: bool = True,
                     variation: int | None = None, subevent: int | None = None, **kw: Any) -> str:
        valid_from, valid_until = kw.get("valid_from"), kw.get("valid_until")
        if signed:
            secret = make_sig1_secret(self.key, item, variation or 0, subevent or 0,
                                      valid_from=int(valid_from.timestamp()) if valid_from else None,
                                      valid_until=int(valid_until.timestamp()) if valid_until else None)
        else:
            secret = "".join(secrets.choice(_SECRET_LETTERS) for _ in range(32))
        pid = next(self._ids)
        with self.lock:
            self.positions[secret] = Position(pid, f"O{pid:04d}", item, secret, attendee_name, variation,
                                              subevent, **kw)
        return secret

    def add_positions(self, count: int, item: int = 1) -> None:
        """`count` paid tickets with random secrets, `generated_secret(0..count-1)`, one order each: a
        big event for benches, made in about a second (no signing, one lock)."""
        with self.lock:
            for i in range(count):
                pid = next(self._ids)
                secret = generated_secret(i)
                self.positions[secret] = Position(pid, f"B{pid:07d}", item, secret, f"Guest {i}")

    def add_medium(self, identifier: str, secrets: list[str], *, active: bool = True,
                   expires: datetime | None = None) -> None:
        """A reusable medium of type barcode (a card) linked to the tickets of `secrets` (by their ids, as
        pretix links them: a ticket given a new secret stays on its card)."""
        with self.lock:
            ids = [self.positions[s].id if s in self.positions else -1 for s in secrets]  # -1: another event's
            self.media.append({"id": next(self._ids), "identifier": identifier, "type": "barcode", "active": active,
                               "expires": expires, "updated": datetime.now(UTC), "_positions": ids})

    def revoke(self, secret: str) -> str:
        """The ticket changed in pretix: it gets a new secret, the old one goes on the revocation list."""
        with self.lock:
            pos = self.positions.pop(secret)
            pos.secret = make_sig1_secret(self.key, pos.item, pos.variation or 0, pos.subevent or 0)
            self.positions[pos.secret] = pos
            self.revoked.append({"id": next(self._ids), "secret": secret, "created": datetime.now(UTC),
                                 "_position": pos.id})
            pos.modified = datetime.now(UTC)
        return pos.secret

    def cancel(self, secret: str) -> str:
        """Cancel the ticket's order. A signed ticket then gets a new secret and the old one is revoked,
        as in real pretix; returns the secret pretix knows the ticket by now."""
        with self.lock:
            self.positions[secret].order_status = "c"
            self.positions[secret].modified = datetime.now(UTC)
        return self.revoke(secret) if _signed(secret) else secret

    def change(self, secret: str, **fields: Any) -> None:
        """Change a ticket or its order in the back office (status, approval, validity...)."""
        with self.lock:
            pos = self.positions[secret]
            for k, v in fields.items():
                setattr(pos, k, v)
            pos.modified = datetime.now(UTC)

    def block(self, secret: str, blocked: bool = True) -> None:
        with self.lock:
            self.positions[secret].blocked = blocked
            self.positions[secret].modified = datetime.now(UTC)
            self.blocked = [b for b in self.blocked if b["secret"] != secret]
            self.blocked.append({"id": next(self._ids), "secret": secret, "blocked": blocked,
                                 "updated": datetime.now(UTC)})

    def successful(self, secret: str) -> list[Checkin]:
        pos = self.positions[secret]
        return [c for c in self.checkins if c.position == pos.id and c.successful]

    # --- plumbing -------------------------------------------------------------------------

    def _auth(self, req: Request) -> Device | Response:
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if not token:
            return Response(401, {"detail": "Authentication credentials were not provided."})
        device = next((d for d in self.setup_tokens.values() if d.token == token and scheme == "Device"), None)
        if device is None:
            return Response(401, {"detail": "Invalid token."})
        if req.params.get("org", self.organizer) != self.organizer or \
                req.params.get("event", self.event) != self.event:
            return Response(403, {"detail": "You do not have permission to perform this action."})
        return device

    def _page(self, req: Request, items: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Response:
        page = int(req.query.get("page", ["1"])[0])
        return self._paged(req, items[(page - 1) * self.page_size: page * self.page_size], len(items), page, headers)

    def _paged(self, req: Request, chunk: list[dict[str, Any]], count: int, page: int,
               headers: dict[str, str] | None = None) -> Response:
        """One page of `count` results, `chunk` being this page's."""
        nxt = None
        if page * self.page_size < count:
            query = {k: v[0] for k, v in req.query.items()} | {"page": str(page + 1)}
            nxt = f"{self.public_url or self.url}{req.path}?{urlencode(query)}"
        return Response(200, {"count": count, "next": nxt, "previous": None, "results": chunk}, headers or {})

    def _position_json(self, pos: Position, list_id: int | None) -> dict[str, Any]:
        """A ticket as pretix shows it; with `list_id`, the check-in list's view (`order__*` fields, its
        check-ins only), else the order's (`canceled`, every list's check-ins)."""
        out = {"id": pos.id, "order": pos.order, "positionid": 1, "item": pos.item, "variation": pos.variation,
               "attendee_name": pos.attendee_name, "secret": pos.secret, "subevent": pos.subevent,
               "valid_from": _iso(pos.valid_from) if pos.valid_from else None,
               "valid_until": _iso(pos.valid_until) if pos.valid_until else None,
               "blocked": ["admin"] if pos.blocked else None,
               "checkins": [{"list": c.list, "type": c.type, "datetime": _iso(c.datetime), "device": c.device,
                             "device_id": c.device, "gate": None, "auto_checked_in": False}
                            for c in self.checkins if c.position == pos.id and c.successful
                            and (list_id is None or c.list == list_id)]}
        if list_id is None:
            return out | {"canceled": pos.canceled}
        return out | {"require_attention": pos.require_attention, "order__status": pos.order_status,
                      "order__valid_if_pending": pos.valid_if_pending,
                      "order__require_approval": pos.require_approval}

    # --- device initialisation ------------------------------------------------------------

    @route("POST", r"/api/v1/device/initialize")
    def initialize(self, req: Request) -> Response:
        try:
            body = req.json()
        except ValueError:
            return Response(400, {"detail": "JSON parse error"})
        missing = {k: ["This field is required."] for k in ("token", "hardware_brand", "hardware_model",
                                                           "software_brand", "software_version")
                   if not isinstance(body, dict) or not body.get(k)}
        if missing:
            return Response(400, missing)
        with self.lock:
            device = self.setup_tokens.get(body["token"])
            if device is None:
                return Response(400, {"token": ["Unknown initialization token."]})
            if device.initialized:
                return Response(400, {"token": ["This initialization token has already been used."]})
            device.initialized, device.token, device.info = True, secrets.token_hex(32), body
        return Response(200, {"organizer": self.organizer, "device_id": device.device_id,
                              "unique_serial": f"SIM{device.device_id:013d}", "api_token": device.token,
                              "name": device.name, "gate": None})

    @route("GET", r"/api/v1/device/info")
    def device_info(self, req: Request) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        gate = {"id": device.gate, "name": f"Gate {device.gate}", "identifier": f"g{device.gate}"} \
            if device.gate else None
        return Response(200, {"device": {"organizer": self.organizer, "device_id": device.device_id,
                                         "unique_serial": f"SIM{device.device_id:013d}", "name": device.name,
                                         "security_profile": "pretixscan", "gate": gate},
                              "server": {"version": {"pretix": "2026.8.0"}}, "medium_key_sets": []})

    # --- event data -------------------------------------------------------------------------

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/")
    def event_detail(self, req: Request) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        return Response(200, {"name": {"en": "Demo Conference"}, "slug": self.event, "live": True,
                              "testmode": False, "currency": "EUR", "date_from": self.date_from,
                              "date_to": None, "date_admission": None, "timezone": self.timezone,
                              "has_subevents": False, "valid_keys": {"pretix_sig1": list(self.valid_keys)}})

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/checkinlists/")
    def checkinlists(self, req: Request) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        items = [lst | {"position_count": len(self.positions), "checkin_count": 0} for lst in self.lists.values()]
        return self._page(req, items)

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/checkinlists/(?P<id>\d+)/")
    def checkinlist_detail(self, req: Request) -> Response:
        device = self._auth(req)  # observed: a device token gets 403 on a single list
        return device if isinstance(device, Response) else Response(403, DENIED_BY_PROFILE)

    def _device_list(self, req: Request) -> dict[str, Any] | Response:
        """The check-in list a device asks about, or the answer refusing it."""
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        lst = self.lists.get(int(req.params["id"]))
        return Response(404, {"detail": "Not found."}) if lst is None else lst

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/checkinlists/(?P<id>\d+)/status/")
    def checkinlist_status(self, req: Request) -> Response:
        lst = self._device_list(req)
        if isinstance(lst, Response):
            return lst
        orders = ("p", "n") if lst["include_pending"] else ("p",)
        with self.lock:
            count = sum(1 for pos in self.positions.values() if self._on_list(pos, lst, orders))
        return Response(200, {"checkin_count": 0, "position_count": count, "inside_count": 0})

    @staticmethod
    def _on_list(pos: Position, lst: dict[str, Any], statuses: tuple[str, ...]) -> bool:
        """pretix's `CheckinList.positions`: not canceled, of these order statuses (or pending and
        `valid_if_pending`), of a product and date of the list."""
        return (not pos.canceled
                and (pos.order_status in statuses or (pos.order_status, pos.valid_if_pending) == ("n", True))
                and (lst["all_products"] or pos.item in lst["limit_products"])
                and (not lst["subevent"] or pos.subevent == lst["subevent"]))

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/orderpositions/")
    def orderpositions(self, req: Request) -> Response:
        device = self._auth(req)  # not in the pretixscan profile's allow list
        return device if isinstance(device, Response) else Response(403, DENIED_BY_PROFILE)

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/checkinlists/(?P<id>\d+)/positions/")
    def checkinlist_positions(self, req: Request) -> Response:
        lst = self._device_list(req)
        if isinstance(lst, Response):
            return lst
        statuses = ("n", "p", "e", "c") if req.query.get("ignore_status", ["false"])[0] == "true" else \
            ("n", "p") if lst["include_pending"] else ("p",)
        with self.lock:  # `modified_since` is not one of this resource's filters: pretix ignores it
            items = [self._position_json(p, lst["id"]) for p in self.positions.values()
                     if self._on_list(p, lst, statuses)]
        return self._page(req, items)

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/orders/")
    def orders(self, req: Request) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        generated = datetime.now(UTC)
        since = req.query.get("modified_since", [None])[0]
        page = int(req.query.get("page", ["1"])[0])
        query = tuple(sorted((k, tuple(v)) for k, v in req.query.items() if k != "page"))
        with self.lock:
            # The orders chosen on a download's first page are kept for its next pages: choosing and
            # sorting 100,000 tickets for each page of 50 would make a download quadratic.
            snapshot = self._orders_snapshot
            if page == 1 or snapshot is None or snapshot[0] != query:
                moment = _parse(since) if since else None
                chosen = sorted((p for p in self.positions.values() if moment is None or p.modified >= moment),
                                key=lambda p: p.id)
                self._orders_snapshot = snapshot = (query, chosen)
            chosen = snapshot[1]
            chunk = chosen[(page - 1) * self.page_size: page * self.page_size]
            items = [{"code": p.order, "status": p.order_status, "require_approval": p.require_approval,
                      "valid_if_pending": p.valid_if_pending, "last_modified": _iso(p.modified),
                      "positions": [self._position_json(p, None)]} for p in chunk]
        return self._paged(req, items, len(chosen), page, {"X-Page-Generated": _iso(generated)})

    def _stamped(self, req: Request, rows: list[dict[str, Any]], stamp: str) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        generated = datetime.now(UTC)
        since = req.query.get(f"{stamp}_since", [None])[0]
        if since:
            rows = [r for r in rows if r[stamp] >= _parse(since)]
        rows = sorted(rows, key=lambda r: r[stamp], reverse=req.query.get("ordering", [f"-{stamp}"])[0][0] == "-")
        items = [{k: (_iso(v) if isinstance(v, datetime) else v) for k, v in r.items() if not k.startswith("_")}
                 for r in rows]
        return self._page(req, items, {"X-Page-Generated": _iso(generated)})

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/reusablemedia/")
    def reusablemedia(self, req: Request) -> Response:
        kind = req.query.get("type", [None])[0]
        with self.lock:
            rows = []
            by_id = {p.id: p for p in self.positions.values()}
            for m in self.media:
                if kind and m["type"] != kind:
                    continue
                linked = [by_id[i] for i in m["_positions"] if i in by_id]
                rows.append(m | {"linked_orderpositions": [
                    {"id": p.id, "secret": p.secret, "item": p.item, "order": {"code": p.order, "event": self.event}}
                    for p in linked]})
            return self._stamped(req, rows, "updated")

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/revokedsecrets/")
    def revokedsecrets(self, req: Request) -> Response:
        with self.lock:
            return self._stamped(req, list(self.revoked), "created")

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/events/(?P<event>[^/]+)/blockedsecrets/")
    def blockedsecrets(self, req: Request) -> Response:
        with self.lock:
            return self._stamped(req, list(self.blocked), "updated")

    # --- check-in ---------------------------------------------------------------------------

    @route("POST", r"/api/v1/organizers/(?P<org>[^/]+)/checkinrpc/redeem/")
    def redeem(self, req: Request) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        try:
            body = req.json()
        except ValueError:
            return Response(400, {"detail": "JSON parse error"})
        errors: dict[str, list[str]] = {}
        lists = body.get("lists") if isinstance(body, dict) else None
        if not isinstance(lists, list) or not lists:
            errors["lists"] = ["This field is required."]
        elif any(i not in self.lists for i in lists):
            errors["lists"] = [f'Invalid pk "{next(i for i in lists if i not in self.lists)}" - object does not exist.']
        if not isinstance(body, dict) or not body.get("secret"):
            errors["secret"] = ["This field is required."]
        kind = body.get("type", "entry") if isinstance(body, dict) else "entry"
        if kind not in ("entry", "exit"):
            errors["type"] = [f'"{kind}" is not a valid choice.']
        moment = datetime.now(UTC)
        if isinstance(body, dict) and body.get("datetime"):
            try:
                moment = _parse(body["datetime"])
            except ValueError:
                errors["datetime"] = ["Datetime has wrong format."]
        if errors:
            return Response(400, errors)
        nonce = body.get("nonce")
        with self.lock:
            if nonce and nonce in self.answers:
                return self.answers[nonce]
            answer = self._redeem(device, body, lists[0], kind, moment)
            if nonce:
                self.answers[nonce] = answer
            return answer

    def _redeem(self, device: Device, body: dict[str, Any], list_id: int, kind: str, moment: datetime) -> Response:
        lst, force, secret = self.lists[list_id], bool(body.get("force")), body["secret"]
        excerpt = {k: lst[k] for k in ("id", "name", "subevent", "include_pending")} | {"event": self.event}
        pos = self.positions.get(secret)
        if pos is None:  # a reusable medium's barcode stands for its (first) ticket while it is active
            medium = next((m for m in self.media if m["identifier"] == secret and m["active"]
                           and (m["expires"] is None or m["expires"] >= datetime.now(UTC))), None)
            if medium is not None:
                by_id = {p.id: p for p in self.positions.values()}
                pos = next((by_id[i] for i in medium["_positions"] if i in by_id), None)
        revoked = next((r for r in self.revoked if r["secret"] == secret), None)
        if pos is None and revoked is not None:
            pos = next(p for p in self.positions.values() if p.id == revoked["_position"])

        def refuse(reason: str, status: int = 400, explanation: str | None = None) -> Response:
            self.checkins.append(Checkin(next(self._ids), body.get("nonce"), pos.id if pos else None, list_id, kind,
                                         moment, device.device_id, False, reason, force, secret))
            out = {"status": "error", "reason": reason, "reason_explanation": explanation,
                   "require_attention": False, "checkin_texts": []}
            if pos is None:
                return Response(status, out | {"detail": "Not found."})
            return Response(status, out | {"list": excerpt, "position": self._position_json(pos, list_id)})

        # A ticket canceled on its own, or of another date than the list's, is not on the list at all.
        if pos is None or pos.canceled or (lst["subevent"] and pos.subevent != lst["subevent"]):
            return refuse("invalid", 404)
        if revoked is not None and not force:
            return refuse("revoked")
        entry = kind == "entry"
        # pretix's perform_checkin, in its order; `force` lets every one of them pass.
        checks = [
            (pos.order_status in ("c", "e"), "canceled" if body.get("canceled_supported") else "unpaid"),
            (pos.blocked, "blocked"),
            (pos.order_status == "n" and pos.require_approval, "unapproved"),
            (entry and bool(pos.valid_from and moment < pos.valid_from), "invalid_time"),
            (entry and bool(pos.valid_until and moment > pos.valid_until), "invalid_time"),
            (not lst["all_products"] and pos.item not in lst["limit_products"], "product"),
            (pos.order_status != "p" and not pos.valid_if_pending
             and not (body.get("ignore_unpaid") and lst["include_pending"] and pos.order_status == "n"), "unpaid"),
            (entry and bool(lst["rules"]), "rules"),
        ]
        failed = next((code for bad, code in checks if bad), None)
        if failed and not force:
            return refuse(failed, explanation="Minimum age 18" if failed == "rules" else None)
        if entry and not force:
            done = sorted((c for c in self.checkins if c.position == pos.id and c.list == list_id and c.successful),
                          key=lambda c: c.datetime)
            allowed = (lst["allow_multiple_entries"] or all(c.type == "exit" for c in done)
                       or (lst["allow_entry_after_exit"] and done[-1].type == "exit"))
            if not allowed:
                return refuse("already_redeemed")
        pos.modified = datetime.now(UTC)
        self.checkins.append(Checkin(next(self._ids), body.get("nonce"), pos.id, list_id, kind, moment,
                                     device.device_id, True, None, force, secret))
        return Response(201, {"status": "ok", "require_attention": pos.require_attention, "checkin_texts": [],
                              "list": excerpt, "position": self._position_json(pos, list_id)})

    @route("POST", r"/api/v1/organizers/(?P<org>[^/]+)/checkinrpc/annul/")
    def annul(self, req: Request) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        try:
            body = req.json()
        except ValueError:
            return Response(400, {"detail": "JSON parse error"})
        if not isinstance(body, dict) or not body.get("nonce") or not body.get("lists"):
            return Response(400, {"nonce": ["This field is required."]})
        moment = _parse(body["datetime"]) if body.get("datetime") else datetime.now(UTC)
        with self.lock:
            found = [c for c in self.checkins if c.nonce == body["nonce"] and c.list in body["lists"]
                     and (c.successful or c.error_reason == "annulled")]
            if not found:
                return Response(404, {"detail": "Not found."})
            if len(found) > 1:
                return Response(400, {"detail": "Multiple check-ins match this nonce."})
            ck = found[0]
            if ck.device != device.device_id:
                return Response(400, {"detail": "Check-in was not made by this device."})
            if not ck.successful:
                return Response(400, {"detail": "Check-in is already annulled or failed."})
            if moment - ck.datetime > ANNUL_WINDOW:
                return Response(400, {"detail": "Check-in is too old to be annulled."})
            ck.successful, ck.error_reason = False, "annulled"
            for pos in self.positions.values():
                if pos.id == ck.position:
                    pos.modified = datetime.now(UTC)
            ck.error_explanation = body.get("error_explanation")
        return Response(200, {"status": "ok"})

    @route("GET", r"/api/v1/organizers/(?P<org>[^/]+)/checkinrpc/search/")
    def search(self, req: Request) -> Response:
        device = self._auth(req)
        if isinstance(device, Response):
            return device
        lists = [int(x) for x in req.query.get("list", [])]
        if not lists:
            return Response(400, {"list": ["This field is required."]})
        text = req.query.get("search", [""])[0].lower()
        with self.lock:
            hits = [self._position_json(p, lists[0]) for p in self.positions.values()
                    if text and (p.secret.lower().startswith(text) or text in p.attendee_name.lower())]
        return self._page(req, hits)


# --- the legacy pretixdroid API ----------------------------------------------------------------


class PretixdroidSim(_QuickStop):
    def __init__(self, organizer: str = "demo", event: str = "democon", key: str = "ABCDEF", **kw):
        super().__init__(**kw)
        self.organizer, self.event, self.key = organizer, event, key
        self.tickets: dict[str, dict[str, Any]] = {}  # secret -> search result fields
        self.redeems: list[str] = []  # secrets checked in, in order

    def add_ticket(self, secret: str, attendee_name: str = "Peter Higgs", *, paid: bool = True) -> str:
        with self.lock:
            self.tickets[secret] = {"secret": secret, "order": f"O{len(self.tickets) + 1:04d}",
                                    "item": "Standard ticket", "variation": None, "attendee_name": attendee_name,
                                    "redeemed": False, "paid": paid}
        return secret

    def _guard(self, req: Request) -> Response | None:
        if (req.params["org"], req.params["event"]) != (self.organizer, self.event):
            return Response(404, "<h1>Not found</h1>", {"Content-Type": "text/html"})
        if req.query.get("key", [""])[0] != self.key:
            return Response(403, "<h1>Forbidden</h1>", {"Content-Type": "text/html"})
        return None

    @staticmethod
    def _json(body: dict[str, Any]) -> Response:
        return Response(200, body | {"version": 2}, {"Content-Type": "text/json"})

    @route("POST", r"/pretixdroid/api/(?P<org>[^/]+)/(?P<event>[^/]+)/redeem/")
    def redeem(self, req: Request) -> Response:
        refused = self._guard(req)
        if refused:
            return refused
        secret = ""
        if req.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            secret = req.form().get("secret", [""])[0]
        with self.lock:
            ticket = self.tickets.get(secret)
            if ticket is None:
                return self._json({"status": "error", "reason": "unknown_ticket"})
            if not ticket["paid"]:
                return self._json({"status": "error", "reason": "unpaid"})
            if ticket["redeemed"]:
                return self._json({"status": "error", "reason": "already_redeemed"})
            ticket["redeemed"] = True
            self.redeems.append(secret)
        return self._json({"status": "ok"})

    @route("GET", r"/pretixdroid/api/(?P<org>[^/]+)/(?P<event>[^/]+)/search/")
    def search(self, req: Request) -> Response:
        refused = self._guard(req)
        if refused:
            return refused
        query = req.query.get("query", [""])[0].lower()
        with self.lock:
            hits = [] if len(query) < 4 else [
                dict(t) for t in self.tickets.values()
                if t["secret"].lower().startswith(query) or query in t["attendee_name"].lower()][:25]
        return self._json({"results": hits})

    @route("GET", r"/pretixdroid/api/(?P<org>[^/]+)/(?P<event>[^/]+)/status/")
    def status(self, req: Request) -> Response:
        refused = self._guard(req)
        if refused:
            return refused
        with self.lock:
            checkins = sum(t["redeemed"] for t in self.tickets.values())
        return self._json({"checkins": checkins, "total": len(self.tickets),
                           "event": {"name": "Demo Conference", "slug": self.event, "timezone": "UTC",
                                     "organizer": {"name": "Demo Organizer", "slug": self.organizer}},
                           "items": []})


def main(argv: list[str] | None = None) -> None:
    """`python -m gated.simulators.pretix`: a bench pretix (or, with --droid, pretixdroid) server."""
    import argparse

    parser = argparse.ArgumentParser(description="pretix device API / pretixdroid simulator (loopback only)")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--organizer", default="demo")
    parser.add_argument("--event", default="democon")
    parser.add_argument("--droid", metavar="KEY_FILE", help="serve the legacy pretixdroid API with this key")
    parser.add_argument("--positions", type=int, default=0, metavar="N",
                        help="also N paid tickets with random secrets (generated_secret(0..N-1)), for benches")
    args = parser.parse_args(argv)
    if args.droid:
        with open(args.droid, encoding="utf-8") as f:
            droid = PretixdroidSim(args.organizer, args.event, f.read().strip(), port=args.port)
        for n in range(1, 4):
            droid.add_ticket(f"demo-ticket-{n:04d}", f"Guest {n}")
        print(f"pretixdroid simulator on {droid.url}; tickets demo-ticket-0001 .. demo-ticket-0003")
        sim: Simulator = droid
    else:
        pretix = PretixSim(args.organizer, args.event, port=args.port)
        print(f"pretix simulator on {pretix.url} (organizer {args.organizer}, event {args.event}, list 1)")
        print(f"setup token: {pretix.new_device()}")
        print(f"device token: {pretix.device_token('Bench gate')}")
        for name in ("Ada", "Bob", "Cy"):
            print(f"signed secret for {name}: {pretix.add_position(1, name)}")
        pretix.add_positions(args.positions)
        sim = pretix
    sim.start()
    print("ready", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        sim.stop()


if __name__ == "__main__":
    main()
