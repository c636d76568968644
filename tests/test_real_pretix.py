"""gated's pretix backend against a real pretix 2026.8.0 (tests/realpretix.py), not our simulator.

Each test here checks something the simulator could get wrong and a venue would notice: pairing,
online verdicts per order state, signed tickets admitted offline (validity 0 is "no limit"), and
what a `pretixscan` device may and may not read (the offline data of issue #19 depends on it).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from gated import cli
from gated.daemon import build
from gated.model import Reason, Scan, ScanMode, Source, Verdict


async def _online(config, *tokens):
    parts = await build(config)
    try:
        return [await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens]
    finally:
        await parts.gate.drain()
        await parts.close()


async def _offline(config, *tokens):
    """Sync from the real server, then decide each token offline as the decider does."""
    parts = await build(config)
    try:
        await parts.backend.sync(parts.store)
        return [await parts.store.call(parts.backend.decide_offline, Scan(token=t), ScanMode.ENTRY, time.time(), True)
                for t in tokens]
    finally:
        await parts.close()


def test_gated_pairs_with_a_setup_token_of_the_real_server_once(real_pretix, real_pretix_lane, capsys):
    config = real_pretix_lane(paired=False)
    token = real_pretix.setup_token()
    assert cli.main(["pair", "--config", config.path, token]) == 0
    out = capsys.readouterr().out
    assert 'paired with pretix as device "spare-' in out and "'Demo Conference'" in out
    assert f"organizer {real_pretix.organizer})" in out
    assert cli.main(["pair", "--config", config.path, token]) == 2
    assert "already been used" in capsys.readouterr().err
    # The stored token works: an online scan is decided by pretix.
    (d,) = asyncio.run(_online(config, real_pretix.order("p").secret))
    assert (d.verdict, d.source) == (Verdict.ADMIT, Source.ONLINE)


def test_online_verdicts_for_every_order_state_are_what_gated_reports(real_pretix, real_pretix_lane):
    srv = real_pretix
    paid, pending, canceled = srv.order("p", name="Grace Hopper"), srv.order("n"), srv.order("c")
    expired = srv.order("p", valid_until=datetime.now(UTC) - timedelta(hours=1))
    early = srv.order("p", valid_from=datetime.now(UTC) + timedelta(hours=1))
    decisions = asyncio.run(_online(real_pretix_lane(), paid.secret, paid.secret, pending.secret, canceled.secret,
                                    "no-such-ticket-secret", expired.secret, early.secret))
    assert [(d.verdict, d.reason, d.backend_code) for d in decisions] == [
        (Verdict.ADMIT, Reason.OK, "ok"),
        (Verdict.DENY, Reason.ALREADY_USED, "already_redeemed"),
        (Verdict.DENY, Reason.NOT_PAID, "unpaid"),
        # Canceling a signed ticket's order revokes its secret: real pretix answers `revoked`,
        # not `canceled` (and without `canceled_supported` it would say `unpaid` for a random one).
        (Verdict.DENY, Reason.REVOKED, "revoked"),
        (Verdict.DENY, Reason.UNKNOWN, "invalid"),
        (Verdict.DENY, Reason.EXPIRED, "invalid_time"),
        (Verdict.DENY, Reason.NOT_YET_VALID, "invalid_time"),
    ]
    assert decisions[0].message == "Grace Hopper" and all(d.source is Source.ONLINE for d in decisions)
    (ck,) = srv.checkins(paid)
    assert ck["type"] == "entry" and ck["gate"] == srv.gate_id("north")


def test_pending_order_is_refused_even_on_an_include_pending_list(real_pretix, real_pretix_lane):
    # pretix admits a pending order on such a list only when the scanner sends ignore_unpaid
    # (pretixSCAN asks its operator first); gated sends false, so pretix refuses.
    (d,) = asyncio.run(_online(real_pretix_lane("pending"), real_pretix.order("n").secret))
    assert (d.reason, d.backend_code) == (Reason.NOT_PAID, "unpaid")


def test_product_limit_and_rules_refusals_carry_pretixs_words(real_pretix, real_pretix_lane):
    ticket = real_pretix.order("p", "Ticket", name="Alan Turing")
    (product,) = asyncio.run(_online(real_pretix_lane("vip_only"), ticket.secret))
    (rules,) = asyncio.run(_online(real_pretix_lane("tickets_rules"), real_pretix.order("p", "VIP", variation="Gold",
                                                                                    name="Ada").secret))
    assert (product.reason, product.backend_code) == (Reason.PRODUCT_NOT_ALLOWED, "product")
    assert (rules.reason, rules.message) == (Reason.RULES, "Ada: Ticket type not allowed")


def test_signed_tickets_made_by_real_pretix_are_admitted_offline(real_pretix, real_pretix_lane):
    srv = real_pretix
    plain = srv.order("p")  # no validity window: pretix writes validFrom/validUntil = 0
    window = srv.order("p", valid_from=datetime.now(UTC) - timedelta(hours=1),
                       valid_until=datetime.now(UTC) + timedelta(hours=1))
    expired = srv.order("p", valid_until=datetime.now(UTC) - timedelta(hours=1))
    canceled = srv.order("c")
    random_secret = srv.order("p", secret="gatedrandomsecret0000000000000001")
    decisions = asyncio.run(_offline(real_pretix_lane(), plain.secret, window.secret, expired.secret, canceled.secret,
                                     random_secret.secret))
    # A random secret is decided from the downloaded tickets (issue #19), not refused as unknown.
    assert [d.reason for d in decisions] == [Reason.OK, Reason.OK, Reason.EXPIRED, Reason.REVOKED, Reason.OK]
    assert decisions[0].admitted and decisions[0].ticket_key == plain.secret


def test_what_a_pretixscan_device_may_read_for_offline_data(real_pretix):
    srv = real_pretix
    device = srv.device_token("north")
    position = srv.order("p", "VIP", variation="Silver")
    srv.checkin(position.secret, "plain")
    lid = srv.lists["plain"]
    # A single list's detail is refused to the device; the collection is not (the syncer uses it).
    assert srv.api("GET", srv.ev(f"checkinlists/{lid}/"), device=device, expect=None).status_code == 403
    denied = srv.api("GET", srv.ev(f"orderpositions/{position.id}/"), device=device, expect=None)
    assert (denied.status_code, denied.json()) == (403, {"detail": "Request denied by device security profile."})
    lists = srv.api("GET", srv.ev("checkinlists/"), device=device).json()["results"]
    assert {x["name"] for x in lists} >= {"plain", "multiple", "after_exit", "pending", "vip_only"}
    # The list's positions carry what an offline decision needs, the order's status included.
    page = srv.api("GET", srv.ev(f"checkinlists/{lid}/positions/"), device=device,
                   params={"search": position.order}).json()["results"]
    (p,) = [x for x in page if x["id"] == position.id]
    assert (p["secret"], p["item"], p["variation"], p["order__status"]) == (
        position.secret, srv.items["VIP"], srv.variations["VIP/Silver"], "p")
    assert [(c["list"], c["type"]) for c in p["checkins"]] == [(lid, "entry")]
    assert p["valid_from"] is None and p["valid_until"] is None and p["blocked"] is None


def test_the_downloaded_tickets_are_counted_as_pretix_counts_each_list(real_pretix, real_pretix_lane):
    """`gated ready` compares gated's count of the downloaded tickets with the list's `position_count`."""
    srv = real_pretix
    srv.order("n", valid_if_pending=True)
    srv.order("n")
    srv.order("c")
    srv.order("p", "VIP", variation="Gold")

    async def counts(config):
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            return await parts.store.call(parts.backend.offline_count), await parts.backend.ticket_count()
        finally:
            await parts.close()

    for name in ("plain", "pending", "vip_only"):
        local, pretix = asyncio.run(counts(real_pretix_lane(name, name)))
        assert local == pretix, name
