"""gated's offline decisions against a real pretix 2026.8.0 (tests/realpretix.py), scan for scan.

The differential test: for check-in lists with each setting and kind of rule, the same scans are
decided twice, on two copies of the same tickets with the same history. One copy by gated offline
(synced first, then with the server unreachable, its clock at each scan's time), the other by
pretix online (redeem with that `datetime`, the same device). The verdicts and pretix's reason codes
must agree scan for scan. After recovery, gated's offline check-ins must reach pretix once each,
with their scan time. The other end-to-end cases: anti-passback across this lane's and the server's
check-ins, annulment when nobody passes, upload without duplicates.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from gated.daemon import build
from gated.model import Reason, Scan, ScanMode, Source, Verdict
from gated.store import Store
from gated.upload import Uploader

SERIES = "democon-series"


def _order(srv, spec: dict, name: str = "Ada Lovelace") -> tuple[str, list[int]]:
    """(secret, ids of its positions) of a new order of one ticket, and its add-ons, as `spec` says
    (see _scenarios); under `addon_match` pretix checks in an add-on when the ticket is scanned.

    With `medium`, a reusable medium (a barcode card) linked to new orders of its `links` specs:
    (its identifier, the ids of their positions in the main event)."""
    now = datetime.now(UTC)
    if "medium" in spec:
        medium = spec["medium"]
        made = [_order(srv, link) for link in medium["links"]]
        identifier = "GATEDCARD" + secrets.token_hex(8).upper()
        expires = (now + timedelta(minutes=medium["expires"])).isoformat() if "expires" in medium else None
        srv.api("POST", "reusablemedia/", json={
            "type": "barcode", "identifier": identifier, "active": medium.get("active", True), "expires": expires,
            "linked_orderpositions": [ids[0] for _, ids in made], "info": {}})
        # Ids of the main event's tickets (where the recovery check reads check-ins).
        return identifier, [i for (_, ids), link in zip(made, medium["links"], strict=True)
                            if link.get("event", srv.event) == srv.event for i in ids]

    def position(spec: dict, number: int, addon_to: int | None = None) -> dict:
        item, _, variation = spec.get("product", "Ticket").partition("/")
        pos = {"positionid": number, "item": srv.items[item], "attendee_name": name, "price": "10.00"}
        if "date" in spec:
            pos["subevent"] = srv.dates[spec["date"]]
        if addon_to:
            pos["addon_to"] = addon_to
        if variation:
            pos["variation"] = srv.variations[f"{item}/{variation}"]
        for key in ("valid_from", "valid_until"):
            if key in spec:
                pos[key] = (now + timedelta(minutes=spec[key])).isoformat()
        if spec.get("random"):
            pos["secret"] = "gated" + secrets.token_hex(14)  # pretix's default kind of secret, not signed
        return pos

    positions = [position(spec, 1)] + [position(a, i, 1) for i, a in enumerate(spec.get("addons", ()), 2)]
    status = spec.get("status", "p")
    body = {"email": "ada@example.org", "locale": "en", "sales_channel": "web", "send_email": False,
            "status": "p" if status == "p" else "n", "require_approval": status == "approval",
            "payment_provider": "manual", "positions": positions}
    event = spec.get("event", srv.event)
    order = srv.api("POST", f"events/{event}/orders/", json=body).json()
    if status in ("c", "e"):
        verb = "mark_canceled" if status == "c" else "mark_expired"
        srv.api("POST", f"events/{event}/orders/{order['code']}/{verb}/",
                json={"send_email": False} if status == "c" else {})
    return order["positions"][0]["secret"], [p["id"] for p in order["positions"]]


def _scenarios(srv, now: datetime) -> list[tuple[str, dict, dict, list]]:
    """(list, its settings, tickets {key: spec}, scans [(key, minutes before now, entry|exit)]).

    A ticket's spec may hold `history`: check-ins made on the server by another scanner before the
    lane syncs, as [(minutes before now, entry|exit)]. A list's settings may name an `event` (the
    series, SERIES) and a ticket's spec its `event` and `date` in it.
    """
    ticket, vip, workshop = srv.items["Ticket"], srv.items["VIP"], srv.items["Workshop"]
    gold = srv.variations["VIP/Gold"]
    tz_midnight = now.astimezone(__import__("zoneinfo").ZoneInfo(srv.timezone)).replace(
        hour=0, minute=0, second=0, microsecond=0)
    since_midnight = max(int((now - tz_midnight).total_seconds() // 60), 10)  # just after midnight: "today" is short
    series = {"event": SERIES, "product": "Day ticket", "random": True}
    after_admission = {"isAfter": [{"var": "now"}, {"buildTime": ["date_admission"]}, None]}
    return [
        ("d_plain", {}, {"a": {}, "b": {"random": True}, "c": {"random": True, "history": [(200, "entry")]},
                         "x": {"unknown": True}},
         [("a", 180, "entry"), ("a", 170, "entry"), ("a", 160, "exit"), ("a", 150, "entry"),
          ("b", 180, "entry"), ("b", 170, "entry"), ("c", 150, "entry"), ("x", 140, "entry")]),
        ("d_after_exit", {"allow_entry_after_exit": True},
         {"a": {"random": True}, "b": {"history": [(300, "entry"), (250, "exit")]}},
         [("a", 180, "entry"), ("a", 170, "entry"), ("a", 160, "exit"), ("a", 150, "entry"), ("a", 140, "entry"),
          ("b", 180, "entry"), ("b", 170, "entry")]),
        ("d_multiple", {"allow_multiple_entries": True}, {"a": {"random": True, "history": [(300, "entry")]}},
         [("a", 180, "entry"), ("a", 170, "entry"), ("a", 160, "exit"), ("a", 150, "entry")]),
        ("d_order_state", {}, {
            "pending": {"status": "n", "random": True}, "canceled": {"status": "c"},
            "canceled_random": {"status": "c", "random": True}, "expired": {"status": "e", "random": True},
            "approval": {"status": "approval", "random": True}, "paid": {"random": True}},
         [(k, 100, kind) for k in ("pending", "canceled", "canceled_random", "expired", "approval", "paid")
          for kind in ("entry", "exit")]),
        ("d_pending", {"include_pending": True}, {"pending": {"status": "n", "random": True}, "paid": {}},
         [("pending", 100, "entry"), ("paid", 100, "entry")]),
        ("d_validity", {}, {
            "early": {"valid_from": -60, "random": True}, "late": {"valid_until": -120, "random": True},
            "window": {"valid_from": -200, "valid_until": -100}},
         [("early", 90, "entry"), ("early", 30, "entry"), ("late", 150, "entry"), ("late", 90, "entry"),
          ("late", 80, "exit"), ("window", 250, "entry"), ("window", 150, "entry"), ("window", 50, "exit")]),
        ("d_products", {"all_products": False, "limit_products": [vip]},
         {"ticket": {"random": True}, "vip": {"product": "VIP/Silver", "random": True}, "signed": {}},
         [("ticket", 100, "entry"), ("ticket", 90, "exit"), ("vip", 100, "entry"), ("signed", 100, "entry")]),
        ("d_rules_product", {"rules": {"or": [{"==": [{"var": "variation"}, gold]}, {"inList": [
            {"var": "product"}, {"objectList": [{"lookup": ["product", str(ticket), "Ticket"]}]}]}]}},
         {"gold": {"product": "VIP/Gold", "random": True}, "silver": {"product": "VIP/Silver", "random": True},
          "ticket": {}},
         [("gold", 100, "entry"), ("silver", 100, "entry"), ("silver", 90, "exit"), ("ticket", 100, "entry")]),
        ("d_rules_entries", {"allow_multiple_entries": True, "rules": {"<": [{"var": "entries_number"}, 3]}},
         {"a": {"random": True, "history": [(400, "entry")]}, "b": {}},
         [("a", 180, "entry"), ("a", 170, "exit"), ("a", 160, "entry"), ("b", 180, "entry"), ("b", 170, "entry"),
          ("b", 160, "entry"), ("b", 150, "entry")]),
        ("d_rules_today", {"allow_multiple_entries": True, "rules": {"<": [{"var": "entries_today"}, 2]}},
         {"a": {"random": True, "history": [(since_midnight + 60, "entry")]}},
         [("a", min(since_midnight - 1, 100), "entry"), ("a", min(since_midnight - 2, 90), "entry"),
          ("a", min(since_midnight - 3, 80), "entry")]),
        ("d_rules_last_entry", {"allow_multiple_entries": True, "rules": {"or": [
            {"==": [{"var": "minutes_since_last_entry"}, -1]}, {">": [{"var": "minutes_since_last_entry"}, 30]}]}},
         {"a": {"random": True, "history": [(200, "entry")]}},
         [("a", 180, "entry"), ("a", 160, "entry"), ("a", 140, "entry"), ("a", 100, "entry")]),
        ("d_rules_gate_time", {"allow_multiple_entries": True, "rules": {"and": [
            {"==": [{"var": "gate"}, srv.gate_id("north")]},
            {"isAfter": [{"var": "now"}, {"buildTime": ["date_admission"]}, 10]}]}},
         {"a": {"random": True}},
         [("a", 200, "entry"), ("a", 185, "entry"), ("a", 175, "entry"), ("a", 100, "entry")]),
        ("d_rules_south_only", {"rules": {"==": [{"var": "gate"}, srv.gate_id("south")]}}, {"a": {}},
         [("a", 100, "entry"), ("a", 90, "exit")]),
        ("d_addons", {"addon_match": True, "all_products": False, "limit_products": [workshop, vip]}, {
            "one": {"random": True, "addons": [{"product": "Workshop", "random": True}]},
            "signed": {"addons": [{"product": "VIP/Silver"}]},
            "two": {"random": True, "addons": [{"product": "Workshop"}, {"product": "VIP/Gold", "random": True}]},
            "two_expired": {"status": "e", "random": True,  # ambiguous comes before the order's state
                            "addons": [{"product": "Workshop"}, {"product": "VIP/Gold"}]},
            "one_valid": {"random": True, "addons": [{"product": "Workshop", "valid_until": -500},
                                                     {"product": "VIP/Gold", "random": True}]},
            "none_valid": {"random": True, "addons": [{"product": "Workshop", "valid_until": -500},
                                                      {"product": "VIP/Gold", "valid_from": 60}]},
            "none_on_list": {"random": True, "addons": [{"product": "Ticket", "random": True}]},
            "unpaid": {"status": "n", "random": True, "addons": [{"product": "Workshop"}]},
            "plain_vip": {"product": "VIP/Gold", "random": True},
            "history": {"random": True, "addons": [{"product": "Workshop"}], "history": [(300, "entry")]}},
         [("one", 180, "entry"), ("one", 170, "entry"), ("one", 160, "exit"), ("signed", 180, "entry"),
          ("two", 180, "entry"), ("two_expired", 180, "entry"), ("one_valid", 180, "entry"),
          ("one_valid", 170, "entry"), ("none_valid", 180, "entry"), ("none_on_list", 180, "entry"),
          ("unpaid", 180, "entry"), ("plain_vip", 180, "entry"), ("history", 180, "entry")]),
        # Reusable media: barcode cards pretix links to tickets (season passes, memberships).
        ("d_media", {}, {
            "card": {"medium": {"links": [{"random": True}]}},
            "family": {"medium": {"links": [{"random": True}, {}]}},
            "inactive": {"medium": {"links": [{"random": True}], "active": False}},
            "expired": {"medium": {"links": [{"random": True}], "expires": -1440}},
            "elsewhere": {"medium": {"links": [series | {"date": "early"}]}},
            "unpaid": {"medium": {"links": [{"status": "n", "random": True}]}}},
         [("card", 100, "entry"), ("card", 90, "entry"), ("card", 80, "exit"), ("family", 100, "entry"),
          ("inactive", 100, "entry"), ("expired", 100, "entry"), ("elsewhere", 100, "entry"),
          ("unpaid", 100, "entry")]),
        ("d_media_vip", {"all_products": False, "limit_products": [vip]}, {
            "family": {"medium": {"links": [{"random": True}, {"product": "VIP/Gold", "random": True}]}},
            "ticket_only": {"medium": {"links": [{"random": True}]}}},
         [("family", 100, "entry"), ("family", 90, "entry"), ("ticket_only", 100, "entry")]),
        # A series: rules on each date's own admission time (pretix's buildTime of the position's date).
        ("d_series_all", {"event": SERIES, "allow_multiple_entries": True, "rules": after_admission},
         {"early": series | {"date": "early"}, "mid": series | {"date": "mid"}, "late": series | {"date": "late"}},
         [("early", 150, "entry"), ("mid", 150, "entry"), ("mid", 100, "entry"), ("late", 100, "entry")]),
        ("d_series_mid", {"event": SERIES, "subevent": srv.dates["mid"], "allow_multiple_entries": True,
                          "rules": after_admission},
         {"early": series | {"date": "early"}, "mid": series | {"date": "mid"}},
         [("early", 100, "entry"), ("mid", 150, "entry"), ("mid", 100, "entry")]),
        ("d_rules_entry_status", {"allow_multiple_entries": True,
                                  "rules": {"==": [{"var": "entry_status"}, "absent"]}},
         {"a": {"random": True, "history": [(300, "entry")]}},
         [("a", 180, "entry"), ("a", 170, "exit"), ("a", 160, "entry"), ("a", 150, "entry")]),
    ]


def test_offline_verdicts_agree_with_real_pretix_scan_for_scan_and_reach_it_once_after_recovery(
        real_pretix, real_pretix_lane):
    srv = real_pretix
    device = srv.device_token("north")
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    scans = lists = disagreements = 0
    report, admitted_offline, codes = [], 0, set()
    srv.add_series(SERIES, {"early": now - timedelta(minutes=200), "mid": now - timedelta(minutes=120),
                            "late": now + timedelta(minutes=60)})
    for list_name, settings, tickets, plan in _scenarios(srv, now):
        lists += 1
        plan = sorted(plan, key=lambda scan: -scan[1])  # one lane, one clock: scans in time order
        event = settings.pop("event", None)
        srv.add_list(list_name, event, **({"all_products": True, "limit_products": []} | settings))
        copies: dict[str, dict[str, tuple[str, int]]] = {"gated": {}, "pretix": {}}
        for side in copies:
            for key, spec in tickets.items():
                if spec.get("unknown"):
                    copies[side][key] = ("gatedunknown" + secrets.token_hex(10), [])
                    continue
                copies[side][key] = _order(srv, spec)
                for minutes, kind in spec.get("history", ()):
                    srv.checkin(copies[side][key][0], list_name, when=now - timedelta(minutes=minutes), type=kind)
        mine = asyncio.run(_gated_offline(real_pretix_lane, list_name,
                                          [(copies["gated"][k][0], now - timedelta(minutes=m), kind)
                                           for k, m, kind in plan], event))
        for (key, minutes, kind), (decision, _) in zip(plan, mine, strict=True):
            answer = srv.redeem(copies["pretix"][key][0], list_name, when=now - timedelta(minutes=minutes), type=kind,
                                device=device)
            theirs = "ok" if answer.get("status") == "ok" else answer.get("reason")
            scans += 1
            codes.add(theirs)
            admitted_offline += decision.admitted
            if decision.source is not Source.OFFLINE or theirs != decision.backend_code:
                disagreements += 1
                report.append(f"{list_name} {key} -{minutes}min {kind}: pretix {theirs!r} "
                              f"({answer.get('reason_explanation')}), gated {decision.backend_code!r} "
                              f"{decision.reason} {decision.source} {decision.message!r}")
        # Recovery: the lane's offline check-ins reach pretix once each, with the scan's time.
        asyncio.run(_upload(real_pretix_lane(list_name, list_name, event=event)))
        for key, spec in tickets.items():
            if spec.get("unknown"):
                continue
            on_server = [c for pid in copies["gated"][key][1] for c in srv.checkins(pid, event)
                         if c["list"] == srv.lists[list_name]]
            mine_here = sorted((round(s.wall, 3), str(m)) for (d, s), (k, _, m) in zip(mine, plan, strict=True)
                               if k == key and d.admitted)
            history = len(spec.get("history", ()))
            uploaded = sorted((round(_parse(c["datetime"]), 3), c["type"]) for c in on_server)
            if len(on_server) != history + len(mine_here) or not set(mine_here) <= set(uploaded):
                report.append(f"{list_name} {key}: pretix holds {uploaded}, expected history {history} "
                              f"+ the lane's {mine_here}")
    print(f"\noffline differential: {scans} scans on {lists} check-in lists, {disagreements} disagreements, "
          f"{admitted_offline} offline check-ins uploaded once each")
    assert report == [], "\n".join(report)
    assert scans >= 70 and 20 <= admitted_offline <= scans - 20
    # Every kind of answer was given (the scenarios did not drift into agreeing on one kind).
    assert codes >= {"ok", "already_redeemed", "invalid", "unpaid", "canceled", "revoked", "unapproved",
                     "invalid_time", "product", "rules", "ambiguous"}, codes


def _parse(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@asynccontextmanager
async def _offline_lane(lane, list_name: str, name: str, event: str | None = None):
    """The parts of lane `name` after a sync with the server up, built again with the server unreachable."""
    parts = await build(lane(list_name, name, event=event))
    try:
        await parts.backend.sync(parts.store)
    finally:
        await parts.close()
    parts = await build(lane(list_name, name, dead=True, event=event))
    try:
        yield parts
    finally:
        await parts.close()


async def _gated_offline(lane, list_name: str, plan: list[tuple[str, datetime, str]], event: str | None = None):
    """Sync with the server up, then decide each scan with it unreachable, the clock at the scan's time."""
    out = []
    async with _offline_lane(lane, list_name, list_name, event) as parts:
        for secret, when, kind in plan:
            parts.gate.scan_mode = ScanMode(kind)
            parts.decider.clock = lambda when=when: when.timestamp()
            scan = Scan(token=secret, reader="front", wall=when.timestamp())
            out.append((await parts.gate.handle(scan), scan))
        await parts.gate.drain()
        return out


async def _upload(config) -> int:
    parts = await build(config)
    try:
        uploader = Uploader(parts.backend, parts.store)
        sent = await uploader.drain()
        again = await uploader.drain()
        stats = await parts.store.call(Store.queue_stats)
        assert (again, stats.pending, stats.parked) == (0, 0, 0)
        return sent
    finally:
        await parts.close()


# --- end to end ---------------------------------------------------------------------------------


def test_anti_passback_counts_the_servers_check_ins_and_the_lanes_own(real_pretix, real_pretix_lane):
    srv = real_pretix
    # pretix's defaults (entry after exit allowed), and at most two entries by the list's rules.
    srv.add_list("e2e_apb", rules={"<": [{"var": "entries_number"}, 2]})
    inside, fresh = _order(srv, {"random": True}), _order(srv, {"random": True})
    srv.checkin(inside[0], "e2e_apb")  # let in by another scanner, before the lane synced

    async def run():
        async with _offline_lane(real_pretix_lane, "e2e_apb", "apb") as parts:
            return [await parts.gate.handle(Scan(token=t, reader="front")) for t in (inside[0], fresh[0], fresh[0])]

    server_side, first, second = asyncio.run(run())
    assert (server_side.reason, first.reason, second.reason) == (Reason.ALREADY_USED, Reason.OK, Reason.ALREADY_USED)
    assert all(d.source is Source.OFFLINE for d in (server_side, first, second))
    # After the upload and a new sync the lane's own check-in is in the download too: counted once, not
    # twice, so after an exit the ticket may enter a second time, and a third entry is refused by the rules.
    asyncio.run(_upload(real_pretix_lane("e2e_apb", "apb")))

    async def exit_and_enter():
        async with _offline_lane(real_pretix_lane, "e2e_apb", "apb") as parts:
            parts.gate.scan_mode = ScanMode.EXIT
            out = [await parts.gate.handle(Scan(token=fresh[0], reader="front"))]
            parts.gate.scan_mode = ScanMode.ENTRY
            return out + [await parts.gate.handle(Scan(token=fresh[0], reader="front")) for _ in range(2)]

    leave, back, third = asyncio.run(exit_and_enter())
    assert (leave.reason, back.reason, third.reason, third.backend_code) == (
        Reason.OK, Reason.OK, Reason.RULES, "rules")
    assert third.message.endswith("Maximum number of entries exceeded")
    assert [c["type"] for c in srv.checkins(fresh[1][0])] == ["entry"]  # the first upload, once


def test_an_add_on_checked_in_online_counts_when_its_ticket_is_scanned_again_offline(real_pretix, real_pretix_lane):
    """Under `addon_match` pretix checks in the add-on of a scanned ticket: the lane counts that add-on,
    so the ticket scanned again once the server is gone (nothing synced since) is already used."""
    srv = real_pretix
    srv.add_list("e2e_addon", addon_match=True, all_products=False, limit_products=[srv.items["Workshop"]])
    secret, ids = _order(srv, {"random": True, "addons": [{"product": "Workshop", "random": True}]})

    async def run():
        parts = await build(real_pretix_lane("e2e_addon", "addon"))
        try:
            await parts.backend.sync(parts.store)
            online = await parts.gate.handle(Scan(token=secret, reader="front"))
            await parts.gate.drain()
        finally:
            await parts.close()
        parts = await build(real_pretix_lane("e2e_addon", "addon", dead=True))
        try:
            return online, await parts.gate.handle(Scan(token=secret, reader="front"))
        finally:
            await parts.close()

    online, offline = asyncio.run(run())
    assert (online.source, online.reason) == (Source.ONLINE, Reason.OK)
    assert [c["list"] for c in srv.checkins(ids[1])] == [srv.lists["e2e_addon"]]  # the add-on, not the ticket
    assert srv.checkins(ids[0]) == []
    assert (offline.source, offline.reason, offline.backend_code) == (Source.OFFLINE, Reason.ALREADY_USED,
                                                                      "already_redeemed")


def test_a_card_whose_only_ticket_was_canceled_alone_is_refused_offline_as_online(real_pretix, real_pretix_lane):
    """pretix's media API leaves canceled tickets off a card, its redeem finds them: pretix says
    `canceled`, gated offline `invalid` ("Medium connected to other event"). Both refuse."""
    srv = real_pretix
    srv.add_list("e2e_card")
    ticket = {"item": srv.items["Ticket"], "attendee_name": "Ada", "price": "10.00"}
    order = srv.api("POST", srv.ev("orders/"), json={
        "email": "ada@example.org", "locale": "en", "sales_channel": "web", "send_email": False, "status": "p",
        "payment_provider": "manual", "positions": [ticket | {"positionid": 1}, ticket | {"positionid": 2}]}).json()
    canceled = order["positions"][0]["id"]
    srv.api("DELETE", srv.ev(f"orderpositions/{canceled}/"), expect=(204,))  # this ticket alone; the order stays paid
    card = "GATEDCARD" + secrets.token_hex(8).upper()
    srv.api("POST", "reusablemedia/", json={"type": "barcode", "identifier": card, "active": True, "expires": None,
                                           "linked_orderpositions": [canceled], "info": {}})

    async def offline():
        async with _offline_lane(real_pretix_lane, "e2e_card", "card") as parts:
            return await parts.gate.handle(Scan(token=card, reader="front"))

    mine = asyncio.run(offline())
    theirs = srv.redeem(card, "e2e_card", device=srv.device_token("north"))
    assert theirs["status"] == "error" and theirs["reason"] == "canceled"
    assert (mine.verdict, mine.source, mine.backend_code) == (Verdict.DENY, Source.OFFLINE, "invalid")


def test_nobody_passing_annuls_the_check_in_on_the_real_server(real_pretix, real_pretix_lane):
    srv = real_pretix
    srv.add_list("e2e_annul")
    secret, (pid,) = _order(srv, {"random": True})
    config = real_pretix_lane("e2e_annul", "annul", extra="[input.passage]\npin = 24\ntimeout_seconds = 0.05\n")

    async def run():
        parts = await build(config)
        try:
            first = await parts.gate.handle(Scan(token=secret, reader="front"))
            await parts.gate.drain()  # the passage timeout runs out: nobody went through
            return first, srv.checkins(pid), await parts.gate.handle(Scan(token=secret, reader="front"))
        finally:
            await parts.gate.drain()
            await parts.close()

    first, after_annul, again = asyncio.run(run())
    assert (first.verdict, first.source) == (Verdict.ADMIT, Source.ONLINE)
    assert after_annul == []  # pretix no longer counts it
    assert (again.verdict, again.source) == (Verdict.ADMIT, Source.ONLINE)  # so the ticket may enter again


def test_offline_check_ins_upload_with_their_time_once_even_when_replayed(real_pretix, real_pretix_lane):
    srv = real_pretix
    srv.add_list("e2e_upload")
    secret, (pid,) = _order(srv, {"random": True})
    when = time.time() - 900

    async def offline_scan():
        async with _offline_lane(real_pretix_lane, "e2e_upload", "up") as parts:
            parts.decider.clock = lambda: when
            return await parts.gate.handle(Scan(token=secret, reader="front", wall=when))

    d = asyncio.run(offline_scan())
    assert (d.verdict, d.source) == (Verdict.ADMIT, Source.OFFLINE)
    assert asyncio.run(_upload(real_pretix_lane("e2e_upload", "up"))) == 1

    async def replay():  # an answer lost on the way back: the same scan is sent again
        parts = await build(real_pretix_lane("e2e_upload", "up"))
        try:
            rows = await parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans")))
            return await parts.backend.upload(rows)
        finally:
            await parts.close()

    assert len(asyncio.run(replay()).sent) == 1
    (ck,) = srv.checkins(pid)
    assert abs(_parse(ck["datetime"]) - when) < 0.002 and ck["gate"] == srv.gate_id("north")


def test_the_next_sync_fetches_only_changed_orders_and_sees_other_scanners_check_ins_and_cancellations(
        real_pretix, real_pretix_lane):
    # The syncer's delta is `orders/?modified_since=`: it relies on pretix changing an order's
    # `last_modified` when one of its tickets is checked in. A cancellation in an event whose tickets
    # are signed revokes the secret, even one of our choosing (`revokedsecrets/?created_since=`).
    srv = real_pretix
    srv.add_list("e2e_delta")
    entered, canceled, untouched = (_order(srv, {"random": True}) for _ in range(3))

    async def sync_then_decide():
        parts = await build(real_pretix_lane("e2e_delta", "delta"))
        try:
            await parts.backend.sync(parts.store)
            whole = bool(parts.backend.last_reload)  # set by a whole download only
            return whole, [await parts.store.call(parts.backend.decide_offline, Scan(token=t), ScanMode.ENTRY,
                                                  time.time(), True) for t, _ in (entered, canceled, untouched)]
        finally:
            await parts.close()

    whole, first = asyncio.run(sync_then_decide())
    assert whole and [d.reason for d in first] == [Reason.OK] * 3
    srv.checkin(entered[0], "e2e_delta")  # by another scanner, after the lane's download
    order = srv.api("GET", srv.ev(f"orderpositions/{canceled[1][0]}/")).json()["order"]
    srv.api("POST", srv.ev(f"orders/{order}/mark_canceled/"), json={"send_email": False})
    whole, second = asyncio.run(sync_then_decide())
    assert not whole and [(d.reason, d.backend_code) for d in second] == [
        (Reason.ALREADY_USED, "already_redeemed"), (Reason.REVOKED, "revoked"), (Reason.OK, "ok")]
