"""pretix device API and legacy pretixdroid backends against their simulators (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gated import cli
from gated.daemon import build
from gated.errors import BackendRejected, GatedError
from gated.model import Reason, Scan, ScanMode, Source, Verdict
from gated.policy.pretix import ROWS_VERSION
from gated.simulators.base import Response
from gated.simulators.pretix import PretixdroidSim, PretixSim, make_sig1_secret
from gated.store import Store
from gated.upload import Uploader


@pytest.fixture
def sim():
    with PretixSim("demo", "democon") as s:
        yield s


@pytest.fixture
def px(sim, load_config):
    def make(extra: str = "", list_id: int = 1, fallback: str = "policy", token_file: str = ""):
        return load_config(f"""
            [backend]
            type = "pretix"
            url = "{sim.url}"
            timeout_seconds = 2.0
            [backend.pretix]
            organizer = "demo"
            event = "democon"
            checkin_list = {list_id}
            token_file = "{token_file}"
            [offline]
            fallback = "{fallback}"
            {extra}
        """)
    return make


def _pair(config, token, capsys):
    rc = cli.main(["pair", "--config", config.path, token])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def paired(sim, px, tmp_path):
    """A gate with a device token (from token_file: pairing itself is tested above)."""
    token = tmp_path / "device.token"
    token.write_text(sim.device_token() + "\n")
    token.chmod(0o600)

    def make(**kw):
        config = px(token_file=str(token), **kw)
        config.lane["debounce_seconds"] = 0.0
        return config
    return make


async def _scan(config, *tokens, sync=False, mode=None):
    parts = await build(config)
    try:
        if mode is not None:
            parts.gate.scan_mode = mode
        if sync:
            await parts.backend.sync(parts.store)
        out = [await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens]
        await parts.gate.drain()
        return out
    finally:
        await parts.close()


def _store(config):
    return Store(config.store.path)


# --- pairing ------------------------------------------------------------------------------------


def test_pair_initialises_the_device_and_keeps_its_token_in_the_owner_only_store(sim, px, capsys):
    config = px()
    rc, out, _ = _pair(config, sim.new_device("North 3"), capsys)
    assert rc == 0 and 'device "North 3"' in out and "'Demo Conference'" in out
    device = next(iter(sim.setup_tokens.values()))
    assert device.info["software_brand"] == "gated" and device.info["hardware_model"]
    store = _store(config)
    try:
        assert store.get("pretix:api_token") == device.token
        assert json.loads(store.get("pretix:device"))["unique_serial"].startswith("SIM")
    finally:
        store.close()
    assert device.token not in out and stat.S_IMODE(os.stat(config.store.path).st_mode) == 0o600
    assert sim.requests[-1].headers["authorization"] == f"Device {device.token}"


def test_pair_accepts_the_setup_qr_text(sim, px, capsys):
    config = px()
    qr = json.dumps({"handshake_version": 1, "url": sim.url, "token": sim.new_device()})
    assert _pair(config, qr, capsys)[0] == 0


@pytest.mark.parametrize("qr,message", [
    ({"handshake_version": 2, "token": "x"}, "update gated"),
    ({"handshake_version": 1, "url": "https://other.example", "token": "x"}, "set [backend] url"),
])
def test_setup_qr_for_a_newer_handshake_or_another_server_is_refused(sim, px, capsys, qr, message):
    rc, _, err = _pair(px(), json.dumps(qr), capsys)
    assert rc == 2 and message in err and sim.requests == []


def test_a_setup_token_works_once(sim, px, capsys):
    config = px()
    token = sim.new_device()
    assert _pair(config, token, capsys)[0] == 0
    rc, _, err = _pair(config, token, capsys)
    assert rc == 2 and "already been used" in err


# --- online ------------------------------------------------------------------------------------


def test_online_redeem_sends_the_list_direction_source_and_the_scans_nonce(sim, paired):
    config = paired()
    secret = sim.add_position(1, "Ada Lovelace")
    parts_nonce = []

    async def run():
        parts = await build(config)
        try:
            scan = Scan(token=secret, reader="front")
            parts_nonce.append(scan.nonce)
            return await parts.gate.handle(scan)
        finally:
            await parts.close()

    d = asyncio.run(run())
    assert (d.verdict, d.reason, d.source, d.message) == (Verdict.ADMIT, Reason.OK, Source.ONLINE, "Ada Lovelace")
    body = sim.requests[-1].json()
    assert sim.requests[-1].path == "/api/v1/organizers/demo/checkinrpc/redeem/"
    assert body | {"secret": "…"} == {"secret": "…", "source_type": "barcode", "lists": [1], "type": "entry",
                                      "force": False, "ignore_unpaid": False, "nonce": parts_nonce[0],
                                      "questions_supported": False, "canceled_supported": True}
    assert len(sim.successful(secret)) == 1


def test_exit_scan_is_sent_as_type_exit(sim, paired):
    config = paired()
    secret = sim.add_position()
    (d,) = asyncio.run(_scan(config, secret, mode=ScanMode.EXIT))
    assert d.admitted and sim.requests[-1].json()["type"] == "exit"


def _position(sim, case, signed=True):
    now = datetime.now(UTC)
    if case == "revoked":
        old = sim.add_position(signed=signed)
        sim.revoke(old)
        return old
    kw = {"unpaid": {"order_status": "n"}, "canceled": {"order_status": "c"}, "blocked": {"blocked": True},
          "early": {"valid_from": now + timedelta(days=1)}, "late": {"valid_until": now - timedelta(days=1)},
          "unapproved": {"order_status": "n", "require_approval": True}, "product": {"item": 99}}[case]
    item = kw.pop("item", 1)
    return sim.add_position(item, signed=signed, **kw)


@pytest.mark.parametrize("case,reason,code", [
    ("unpaid", Reason.NOT_PAID, "unpaid"), ("canceled", Reason.CANCELED, "canceled"),
    ("blocked", Reason.BLOCKED, "blocked"), ("early", Reason.NOT_YET_VALID, "invalid_time"),
    ("late", Reason.EXPIRED, "invalid_time"), ("unapproved", Reason.NOT_APPROVED, "unapproved"),
    ("product", Reason.PRODUCT_NOT_ALLOWED, "product"), ("revoked", Reason.REVOKED, "revoked"),
])
def test_every_pretix_refusal_maps_to_its_reason_and_keeps_pretix_code(sim, paired, case, reason, code):
    sim.lists[1].update(all_products=False, limit_products=[1])
    config = paired()
    (d,) = asyncio.run(_scan(config, _position(sim, case)))
    assert (d.verdict, d.reason, d.backend_code, d.source) == (Verdict.DENY, reason, code, Source.ONLINE)


def test_unknown_secret_is_unknown_and_second_entry_is_already_used(sim, paired):
    config = paired()
    secret = sim.add_position()
    decisions = asyncio.run(_scan(config, "nosuchsecret1234", secret, secret))
    assert [(d.reason, d.backend_code) for d in decisions] == [
        (Reason.UNKNOWN, "invalid"), (Reason.OK, "ok"), (Reason.ALREADY_USED, "already_redeemed")]


def test_rules_refusal_shows_pretixs_explanation(sim, paired):
    sim.lists[1]["rules"] = {"and": [{"isAfter": []}]}
    config = paired()
    (d,) = asyncio.run(_scan(config, sim.add_position(1, "Bob")))
    assert d.reason is Reason.RULES and d.message == "Bob: Minimum age 18"


def test_refused_device_token_decides_offline_and_says_to_pair_again(sim, paired):
    config = paired()
    for device in sim.setup_tokens.values():
        device.token = "revoked-in-pretix"
    (d,) = asyncio.run(_scan(config, sim.add_position()))
    assert d.source is Source.OFFLINE and "pair again" in d.detail


# --- offline data -------------------------------------------------------------------------------


async def _decided(parts, *tokens, mode=ScanMode.ENTRY, now=None):
    """Decide each token from the offline data of `parts` (the store's own thread, as the decider does)."""
    return [await parts.store.call(parts.backend.decide_offline, Scan(token=t), mode, now or time.time(), True)
            for t in tokens]


def _offline(config, *tokens, now=None):
    """Decide each token from the synced offline data."""

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            return await _decided(parts, *tokens, now=now)
        finally:
            await parts.close()
    return asyncio.run(run())


def test_signed_secrets_are_decided_offline_with_one_reason_per_fault(sim, paired):
    sim.lists[1].update(all_products=False, limit_products=[1, 2])
    config = paired()
    now = datetime.now(UTC)
    good = sim.add_position(1)
    revoked = sim.add_position(2)
    sim.revoke(revoked)
    blocked = sim.add_position(1)
    sim.block(blocked)
    early = sim.add_position(1, valid_from=now + timedelta(hours=2))
    late = sim.add_position(1, valid_until=now - timedelta(hours=2))
    other_product = sim.add_position(7)
    changed = good[:20] + ("B" if good[20] != "B" else "C") + good[21:]
    foreign = make_sig1_secret(Ed25519PrivateKey.generate(), 1)
    decisions = _offline(config, good, revoked, blocked, early, late, other_product, changed, foreign,
                         "az9u4mymhqktrbupmwkvv6xmgds5dk3x", good[:-12])
    assert [d.reason for d in decisions] == [
        Reason.OK, Reason.REVOKED, Reason.BLOCKED, Reason.NOT_YET_VALID, Reason.EXPIRED,
        Reason.PRODUCT_NOT_ALLOWED, Reason.INVALID_SIGNATURE, Reason.INVALID_SIGNATURE, Reason.UNKNOWN,
        Reason.UNKNOWN]
    assert decisions[0].ticket_key == good and decisions[0].admitted


def test_ticket_for_another_date_of_a_series_is_wrong_event_offline(sim, paired):
    sim.lists[1]["subevent"] = 11
    config = paired()
    (d,) = _offline(config, sim.add_position(1, subevent=12))
    assert (d.reason, d.backend_code) == (Reason.WRONG_EVENT, "invalid")  # pretix does not find it on the list


def test_gate_decides_signed_secrets_offline_when_pretix_is_down_with_anti_passback(sim, paired):
    config = paired()
    secret = sim.add_position()

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            sim.fail_status = 502
            return [await parts.gate.handle(Scan(token=secret, reader="front")) for _ in range(2)]
        finally:
            await parts.close()

    first, second = asyncio.run(run())
    assert (first.verdict, first.source) == (Verdict.ADMIT, Source.OFFLINE) and "HTTP 502" in first.detail
    assert second.reason is Reason.ALREADY_USED


def test_revocations_are_fetched_as_deltas_across_pages_and_unblocking_takes_effect(sim, paired):
    sim.page_size = 2
    sim.public_url = "https://pretix.behind-a-proxy.example"  # `next` names pretix's own host
    config = paired()
    olds = [sim.add_position() for _ in range(5)]
    for s in olds[:3]:
        sim.revoke(s)
    blocked = sim.add_position()
    sim.block(blocked)

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            first = await _decided(parts, *olds, blocked)
            for s in olds[3:]:
                sim.revoke(s)
            sim.block(blocked, False)
            mark = len(sim.requests)
            await parts.backend.sync(parts.store)
            second = await _decided(parts, *olds, blocked)
            return first, second, sim.requests[mark:]
        finally:
            await parts.close()

    first, second, requests = asyncio.run(run())
    assert [d.reason for d in first] == [Reason.REVOKED] * 3 + [Reason.OK] * 2 + [Reason.BLOCKED]
    assert [d.reason for d in second] == [Reason.REVOKED] * 5 + [Reason.OK]
    delta = [r for r in requests if r.path.endswith("/revokedsecrets/")]
    assert delta[0].query["created_since"] and delta[0].query["ordering"] == ["-created"]
    assert all(r.headers["host"].startswith("127.0.0.1") for r in requests)


def test_random_secrets_are_decided_offline_from_the_downloaded_tickets(sim, paired):
    sim.valid_keys.clear()  # an event with random secrets: no signature to check offline
    config = paired(fallback="deny")
    secret = sim.add_position(signed=False, attendee_name="Grace Hopper")

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            sim.fail_status = 503
            return [await parts.gate.handle(Scan(token=t, reader="front"))
                    for t in (secret, secret, "az9u4mymhqktrbupmwkvv6xmgds5dk3x")]
        finally:
            await parts.close()

    first, again, unknown = asyncio.run(run())
    assert (first.verdict, first.reason, first.source, first.message) == (
        Verdict.ADMIT, Reason.OK, Source.OFFLINE, "Grace Hopper")
    assert (again.reason, again.backend_code) == (Reason.ALREADY_USED, "already_redeemed")
    assert (unknown.reason, unknown.backend_code) == (Reason.UNKNOWN, "invalid")


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "random"])
@pytest.mark.parametrize("case,reason,code", [
    ("unpaid", Reason.NOT_PAID, "unpaid"), ("canceled", Reason.CANCELED, "canceled"),
    ("blocked", Reason.BLOCKED, "blocked"), ("early", Reason.NOT_YET_VALID, "invalid_time"),
    ("late", Reason.EXPIRED, "invalid_time"), ("unapproved", Reason.NOT_APPROVED, "unapproved"),
    ("product", Reason.PRODUCT_NOT_ALLOWED, "product"), ("revoked", Reason.REVOKED, "revoked"),
])
def test_every_refusal_is_decided_offline_with_pretixs_reason_and_code(sim, paired, case, reason, code, signed):
    sim.lists[1].update(all_products=False, limit_products=[1])
    config = paired()
    (d,) = _offline(config, _position(sim, case, signed))
    assert (d.verdict, d.reason, d.backend_code, d.source) == (Verdict.DENY, reason, code, Source.OFFLINE)


def test_pending_orders_on_an_include_pending_list_are_unpaid_offline_as_online_unless_valid_if_pending(sim, paired):
    sim.lists[1]["include_pending"] = True
    config = paired()
    pending, valid = sim.add_position(order_status="n"), sim.add_position(order_status="n", valid_if_pending=True)
    online = asyncio.run(_scan(config, pending, valid))
    offline = _offline(config, sim.add_position(order_status="n"),
                       sim.add_position(order_status="n", valid_if_pending=True))
    assert [d.reason for d in online] == [d.reason for d in offline] == [Reason.NOT_PAID, Reason.OK]


def test_exit_scans_offline_skip_validity_and_entry_limits_but_not_the_order_state(sim, paired):
    config = paired()
    now = datetime.now(UTC)
    late, canceled = sim.add_position(valid_until=now - timedelta(hours=1)), sim.add_position(order_status="c")

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            return await _decided(parts, late, late, canceled, mode=ScanMode.EXIT)
        finally:
            await parts.close()

    assert [d.reason for d in asyncio.run(run())] == [Reason.OK, Reason.OK, Reason.CANCELED]


def test_rules_and_entry_after_exit_count_the_servers_check_ins_with_the_lanes_own(sim, paired):
    sim.lists[1].update(allow_entry_after_exit=True, rules={"<": [{"var": "entries_number"}, 2]})
    config = paired()
    secret = sim.add_position(signed=False)
    sim.checkins.append(_server_checkin(sim, secret, "entry", minutes_ago=30))  # another scanner let them in

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            sim.fail_status = 503
            out = [await parts.gate.handle(Scan(token=secret, reader="front"))]  # inside already: used
            parts.gate.scan_mode = ScanMode.EXIT
            out.append(await parts.gate.handle(Scan(token=secret, reader="front")))
            parts.gate.scan_mode = ScanMode.ENTRY
            out.append(await parts.gate.handle(Scan(token=secret, reader="front")))  # 2nd entry: rules allow
            parts.gate.scan_mode = ScanMode.EXIT
            out.append(await parts.gate.handle(Scan(token=secret, reader="front")))
            parts.gate.scan_mode = ScanMode.ENTRY
            out.append(await parts.gate.handle(Scan(token=secret, reader="front")))  # a 3rd: the rules say no
            return out
        finally:
            await parts.close()

    decisions = asyncio.run(run())
    assert [(d.reason, d.backend_code) for d in decisions] == [
        (Reason.ALREADY_USED, "already_redeemed"), (Reason.OK, "ok"), (Reason.OK, "ok"), (Reason.OK, "ok"),
        (Reason.RULES, "rules")]
    assert decisions[-1].message.endswith("Maximum number of entries exceeded")


@pytest.mark.parametrize("include_pending", [False, True])
def test_the_downloaded_tickets_are_counted_as_pretix_counts_its_list(sim, paired, include_pending):
    # `gated ready` compares the two: a difference says the offline data is incomplete.
    sim.lists[1].update(include_pending=include_pending, all_products=False, limit_products=[1])
    config = paired()
    sim.add_position(signed=False)
    sim.add_position(signed=False, order_status="n", valid_if_pending=True)  # counted on every list
    sim.add_position(signed=False, order_status="n")
    sim.add_position(2, signed=False)
    sim.add_position(signed=False, order_status="c")

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            return await parts.store.call(parts.backend.offline_count), await parts.backend.ticket_count()
        finally:
            await parts.close()

    assert asyncio.run(run()) == ((3, 3) if include_pending else (2, 2))


def test_deltas_download_only_changed_orders_and_take_effect(sim, paired):
    sim.page_size = 2
    config = paired()
    secrets = [sim.add_position(signed=False) for _ in range(5)]

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            before = await _decided(parts, *secrets[:2])
            sim.change(secrets[0], order_status="c")
            sim.checkins.append(_server_checkin(sim, secrets[1], "entry", minutes_ago=1))
            sim.positions[secrets[1]].modified = datetime.now(UTC)
            mark = len(sim.requests)
            await parts.backend.sync(parts.store)
            after = await _decided(parts, *secrets[:3])
            return before, after, sim.requests[mark:]
        finally:
            await parts.close()

    before, after, requests = asyncio.run(run())
    assert [d.reason for d in before] == [Reason.OK, Reason.OK]
    assert [d.reason for d in after] == [Reason.CANCELED, Reason.ALREADY_USED, Reason.OK]
    (orders,) = [r for r in requests if r.path.endswith("/orders/")]  # two changed orders: one page
    assert orders.query["modified_since"]


def test_a_list_downloaded_by_an_older_gated_is_downloaded_whole_again_after_the_upgrade(sim, paired):
    # Rows of an older gated lack what a newer one decides with (the add-ons' secrets): a delta would
    # leave every unchanged ticket without it.
    config = paired()
    sim.add_position(signed=False)

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)

            def as_the_older_gated_left_it(store: Store) -> None:  # its key had no rows version
                with store._write() as conn:
                    old = "pretix:demo/democon:orders_since:1:None"
                    renamed = conn.execute("UPDATE kv SET key = ? WHERE key = ?", (old, f"{old}:{ROWS_VERSION}"))
                    assert renamed.rowcount == 1

            await parts.store.call(as_the_older_gated_left_it)
            mark = len(sim.requests)
            await parts.backend.sync(parts.store)
            return sim.requests[mark:]
        finally:
            await parts.close()

    (orders,) = [r for r in asyncio.run(run()) if r.path.endswith("/orders/")]
    assert "modified_since" not in orders.query


def test_a_whole_download_is_written_by_the_reload_process_page_by_page(sim, paired):
    # In the daemon's own process the rows of every ticket were held until the swap, and parsing
    # 2,000 pages held up scans (benchmarks/README.md, "pretix"): a child process does it now.
    sim.page_size = 2
    config = paired()
    secrets = [sim.add_position(signed=False) for _ in range(5)]

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            result = dict(parts.backend.last_reload)
            (decided,) = await _decided(parts, secrets[4])
            # A download that fails on a later page leaves the list in use as it was.
            await parts.store.call(lambda store: store.set(
                f"pretix:demo/democon:orders_since:1:None:{ROWS_VERSION}", ""))
            sim.add_position(signed=False)
            sim.page_size = 1
            original = sim.orders

            def failing(req):
                return Response(400, {"detail": "no"}) if req.query.get("page", ["1"])[0] == "3" else original(req)

            sim.replace_route(original, failing)
            with pytest.raises(BackendRejected, match="orders: HTTP 400"):
                await parts.backend.sync(parts.store)
            kept = await parts.store.call(Store.ticket_count, parts.backend.positions_name)
            return result, decided, kept
        finally:
            await parts.close()

    result, decided, kept = asyncio.run(run())
    assert result["tickets"] == 5 and result["peak_rss_mb"] > 0 and result["generated"]
    assert result["pid"] != os.getpid()
    assert decided.reason is Reason.OK
    assert kept == 5


def _server_checkin(sim, secret, kind, minutes_ago):
    from gated.simulators.pretix import Checkin
    pos = sim.positions[secret]
    return Checkin(id=len(sim.checkins) + 1000, nonce=None, position=pos.id, list=1, type=kind,
                   datetime=datetime.now(UTC) - timedelta(minutes=minutes_ago), device=999)


def test_a_check_in_list_that_does_not_exist_is_named_when_syncing(sim, paired):
    config = paired(list_id=9)

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
        finally:
            await parts.close()

    with pytest.raises(Exception, match=r"checkin_list = 9: not a check-in list of event 'democon' \(its lists: 1\)"):
        asyncio.run(run())


# --- upload and annulment -----------------------------------------------------------------------


def test_offline_check_ins_are_replayed_with_their_time_nonce_and_force_exactly_once(sim, paired):
    config = paired()
    secret = sim.add_position()
    other = sim.add_position(1)

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            sim.fail_status = 503
            scans = [Scan(token=secret, reader="front", wall=time.time() - 600),
                     Scan(token=other, reader="front"), Scan(token="not-signed-at-all", reader="front")]
            decisions = [await parts.gate.handle(s) for s in scans]
            del sim.positions[other]  # deleted in pretix meanwhile: refused even with force
            sim.fail_status = None
            uploader = Uploader(parts.backend, parts.store)
            sent = await uploader.drain()
            again = await uploader.drain()
            rows = await parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans ORDER BY id")))
            replay = await parts.backend.upload([rows[0]])  # a second replay of the same scan
            return scans, decisions, sent, again, replay, await parts.store.call(Store.queue_stats)
        finally:
            await parts.close()

    scans, decisions, sent, again, replay, stats = asyncio.run(run())
    assert [d.admitted for d in decisions] == [True, True, False]
    (ck,) = sim.successful(secret)
    assert ck.forced and ck.nonce == scans[0].nonce
    assert abs(ck.datetime.timestamp() - scans[0].wall) < 0.002
    assert (sent, again, stats.pending, stats.parked) == (2, 0, 0, 1)
    assert replay.sent == [scans[0].nonce] and len(sim.successful(secret)) == 1


def test_nobody_passing_annuls_the_check_in_by_nonce_and_the_ticket_can_enter_again(sim, paired):
    config = paired(extra="[input.passage]\npin = 24\ntimeout_seconds = 0.05\n")
    secret = sim.add_position()

    async def run():
        parts = await build(config)
        try:
            out = []
            for _ in range(2):
                out.append(await parts.gate.handle(Scan(token=secret, reader="front")))
                await parts.gate.drain()  # the passage timeout runs out: nobody went through
            return out
        finally:
            await parts.close()

    first, second = asyncio.run(run())
    assert first.admitted and second.admitted
    annul = [r for r in sim.requests if r.path.endswith("/checkinrpc/annul/")]
    assert len(annul) == 2 and annul[0].json()["nonce"] == sim.checkins[0].nonce
    assert [c.error_reason for c in sim.checkins] == ["annulled", "annulled"]


def test_lookup_searches_the_check_in_list(sim, paired, capsys):
    config = paired()
    secret = sim.add_position(1, "Grace Hopper")
    assert cli.main(["lookup", "--config", config.path, secret]) == 0
    out = capsys.readouterr().out
    assert "1 match(es) on check-in list 1" in out and "Grace Hopper" in out and secret not in out


def test_lookup_shows_the_servers_words_on_their_own_line_and_skips_what_is_not_a_ticket(sim, paired, capsys):
    # An attendee name is anyone's input: it must not write a line of its own (or terminal escapes)
    # into the operator's output, and a result of another shape must not end the command in a traceback.
    config = paired()
    secret = sim.add_position(1, "Grace\n  ticket API: 0 match(es)\x1b[2J")
    real_page = sim._page
    sim._page = lambda req, items: real_page(req, [*items, "not a ticket", {"secret": 7}])
    assert cli.main(["lookup", "--config", config.path, secret]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    (line,) = [x for x in out.splitlines() if "Grace" in x]
    assert "Grace\\x0a  ticket API: 0 match(es)\\x1b[2J" in line and secret not in out


# --- pretixdroid (legacy) -----------------------------------------------------------------------


@pytest.fixture
def droid(load_config, tmp_path):
    key = tmp_path / "droid.key"
    key.write_text("S3CRET-KEY\n")
    key.chmod(0o600)
    with PretixdroidSim("demo", "democon", "S3CRET-KEY") as s:
        def make(fallback="deny", key_file=key):
            config = load_config(f'[backend]\ntype = "pretixdroid"\nurl = "{s.url}"\ntimeout_seconds = 2.0\n'
                                 f'[backend.pretixdroid]\norganizer = "demo"\nevent = "democon"\n'
                                 f'key_file = "{key_file}"\n[offline]\nfallback = "{fallback}"\n')
            config.lane["debounce_seconds"] = 0.0
            return config
        s.config = make
        yield s


def test_pretixdroid_redeems_with_the_secret_form_field_and_key_query(droid):
    droid.add_ticket("az9u4mymhqktrbupmwkvv6xmgds5dk3", "Peter Higgs")
    droid.add_ticket("unpaid-ticket-0001", paid=False)
    decisions = asyncio.run(_scan(droid.config(), "az9u4mymhqktrbupmwkvv6xmgds5dk3",
                                  "az9u4mymhqktrbupmwkvv6xmgds5dk3", "unpaid-ticket-0001", "nope"))
    assert [(d.reason, d.backend_code) for d in decisions] == [
        (Reason.OK, "ok"), (Reason.ALREADY_USED, "already_redeemed"), (Reason.NOT_PAID, "unpaid"),
        (Reason.UNKNOWN, "unknown_ticket")]
    first = droid.requests[0]
    assert first.query["key"] == ["S3CRET-KEY"] and first.form() == {"secret": ["az9u4mymhqktrbupmwkvv6xmgds5dk3"]}


def test_pretixdroid_wrong_key_decides_offline_by_the_fallback(droid, tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("WRONG")
    bad.chmod(0o600)
    droid.add_ticket("ticket-0001")
    (d,) = asyncio.run(_scan(droid.config(key_file=bad), "ticket-0001"))
    assert d.reason is Reason.OFFLINE_NO_DATA and "key refused" in d.detail and droid.redeems == []


def test_pretixdroid_fallback_admit_keeps_anti_passback_and_replays_once(droid):
    config = droid.config(fallback="admit")
    droid.add_ticket("ticket-0001")
    droid.add_ticket("ticket-0002")

    async def run():
        parts = await build(config)
        try:
            droid.fail_status = 503
            decisions = [await parts.gate.handle(Scan(token=t, reader="front"))
                         for t in ("ticket-0001", "ticket-0001", "ticket-0002", "forged-0003")]
            droid.fail_status = None
            uploader = Uploader(parts.backend, parts.store)
            return decisions, await uploader.drain(), await uploader.drain(), \
                await parts.store.call(Store.queue_stats)
        finally:
            await parts.close()

    decisions, sent, again, stats = asyncio.run(run())
    assert [d.reason for d in decisions] == [Reason.FALLBACK_ADMIT, Reason.ALREADY_USED, Reason.FALLBACK_ADMIT,
                                             Reason.FALLBACK_ADMIT]
    assert droid.redeems == ["ticket-0001", "ticket-0002"]
    assert (sent, again, stats.pending, stats.parked) == (3, 0, 0, 1)  # the forged code is parked, visible


def test_pretixdroid_lookup_uses_search(droid, capsys):
    config = droid.config()
    droid.add_ticket("az9u4mymhqktrbupmwkvv6xmgds5dk3", "Peter Higgs")
    assert cli.main(["lookup", "--config", config.path, "az9u4mymhq"]) == 0
    assert "Peter Higgs" in capsys.readouterr().out


def test_a_ticket_canceled_on_its_own_is_refused_online_and_offline_signed_or_not(sim, paired):
    """One ticket of a paid order canceled in pretix: the order stays paid, the ticket is off the list.
    Its signature is still good, so only the download can tell: it must, never an admit."""
    config = paired()
    tickets = [sim.add_position(signed=False), sim.add_position(signed=True)]
    for secret in tickets:
        sim.change(secret, canceled=True)
    offline = _offline(config, *tickets)
    assert [(d.verdict, d.reason) for d in offline] == [(Verdict.DENY, Reason.UNKNOWN)] * 2
    online = asyncio.run(_scan(config, *tickets))
    assert [(d.verdict, d.source) for d in online] == [(Verdict.DENY, Source.ONLINE)] * 2


# --- odd shapes from the server, add-ons -----------------------------------------------------------


@pytest.mark.parametrize("odd", [{"limit_products": "1"}, {"limit_products": [1, "2"]}, {"addon_match": "false"},
                                 {"all_products": 1}, {"subevent": "1\n2"}, {"subevent": 2**70}, {"rules": []}])
def test_a_check_in_list_in_an_odd_shape_fails_that_sync_and_the_data_before_it_stays_in_use(sim, paired, odd):
    config = paired()
    secret = sim.add_position(signed=False)

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            sim.lists[1].update(odd)
            with pytest.raises(GatedError, match="check-in list"):
                await parts.backend.sync(parts.store)
            (decided,) = await _decided(parts, secret)
            return decided
        finally:
            await parts.close()

    assert asyncio.run(run()).reason is Reason.OK


def test_an_online_answer_naming_its_ticket_oddly_is_still_the_admission_pretix_made(sim, paired):
    config = paired()
    secret = sim.add_position(signed=False)
    original = sim.redeem

    def odd(req):
        answer = original(req)
        answer.body["position"]["secret"] = 5  # the checked-in ticket's secret, in no usable shape
        return answer

    sim.replace_route(original, odd)
    (d,) = asyncio.run(_scan(config, secret))
    assert (d.reason, d.source, d.ticket_key) == (Reason.OK, Source.ONLINE, secret)


def _order_with_addons(addons: list[dict]) -> dict:
    """An order as pretix's `orders/` shows it: ticket 1 and its add-ons (item 2 unless said)."""
    def position(pid: int, item: int, **kw) -> dict:
        return {"id": pid, "positionid": pid, "item": item, "variation": None, "subevent": None, "addon_to": None,
                "secret": f"sec{pid:04d}" + "x" * 20, "attendee_name": "Ada", "canceled": False, "blocked": None,
                "valid_from": None, "valid_until": None, "checkins": []} | kw
    return {"code": "ABC12", "status": "p", "valid_if_pending": False, "require_approval": False,
            "positions": [position(1, 1)] + [position(i, **({"item": 2} | a), addon_to=1)
                                             for i, a in enumerate(addons, 2)]}


def _addon_offline(sim, config, order: dict, *, clock_trusted: bool = True):
    """The scanned ticket (position 1 of `order`) decided offline on a list with `addon_match` for item 2."""
    from gated.policy.pretix import _position_rows

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            backend = parts.backend

            def with_addons(store: Store) -> None:
                value, _ = store.get_data(backend.offline_name)
                value["list"] |= {"addon_match": True, "all_products": False, "limit_products": [2]}
                store.put_data(backend.offline_name, value)
                store.load_tickets(backend.positions_name, _position_rows(order, 1, value["list"]))

            await parts.store.call(with_addons)
            return await parts.store.call(backend.decide_offline, Scan(token=order["positions"][0]["secret"]),
                                          ScanMode.ENTRY, time.time(), clock_trusted)
        finally:
            await parts.close()
    return asyncio.run(run())


def test_on_an_addon_match_list_the_ticket_stands_for_its_one_add_on_on_the_list(sim, paired):
    d = _addon_offline(sim, paired(), _order_with_addons([{}, {"item": 3}]))
    assert (d.reason, d.ticket_key) == (Reason.OK, "sec0002" + "x" * 20)  # the add-on is the one checked in


def test_two_add_ons_on_the_list_are_ambiguous_unless_only_one_is_valid_by_a_trusted_clock(sim, paired):
    config = paired()
    order = _order_with_addons([{"valid_until": "2020-01-01T00:00:00Z"}, {}])
    assert _addon_offline(sim, config, order).reason is Reason.OK
    untrusted = _addon_offline(sim, config, order, clock_trusted=False)
    assert (untrusted.reason, untrusted.backend_code) == (Reason.AMBIGUOUS, "ambiguous")


def test_a_ticket_with_more_add_ons_than_gated_looks_at_is_not_decided_offline(sim, paired):
    d = _addon_offline(sim, paired(), _order_with_addons([{"item": 3}] * 40))
    assert d.reason is Reason.AMBIGUOUS and "more than 32 add-ons" in d.message


# --- reusable media ---------------------------------------------------------------------------------


def _offline_scans(config, sim, tokens, between=None):
    """Sync, decide `tokens` offline one by one through the gate (each admission recorded), `between()`
    then a second sync and the same tokens again; returns both rounds' decisions."""
    async def run():
        parts = await build(config)
        try:
            rounds = []
            for round_ in range(2 if between else 1):
                await parts.backend.sync(parts.store)
                sim.fail_status = 503
                rounds.append([await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens])
                sim.fail_status = None
                if between and round_ == 0:
                    between()
            return rounds
        finally:
            sim.fail_status = None
            await parts.close()
    return asyncio.run(run())


def test_a_reusable_medium_stands_for_its_ticket_offline_and_counts_as_that_ticket(sim, paired):
    config = paired()
    ticket = sim.add_position(signed=False)
    sim.add_medium("CARD-000123", [ticket])
    (decisions,) = _offline_scans(config, sim, ["CARD-000123", "CARD-000123", ticket])
    assert [(d.reason, d.source) for d in decisions] == [
        (Reason.OK, Source.OFFLINE), (Reason.ALREADY_USED, Source.OFFLINE), (Reason.ALREADY_USED, Source.OFFLINE)]
    assert decisions[0].ticket_key == ticket


def test_a_medium_deactivated_or_expired_in_pretix_is_refused_offline_after_the_next_sync(sim, paired):
    config = paired()
    ticket, other = sim.add_position(signed=False), sim.add_position(signed=False)
    sim.add_medium("CARD-1", [ticket])
    sim.add_medium("CARD-2", [other])

    def change():
        sim.media[0].update(active=False, updated=datetime.now(UTC))
        sim.media[1].update(expires=datetime.now(UTC) - timedelta(minutes=1), updated=datetime.now(UTC))

    before, after = _offline_scans(config, sim, ["CARD-1", "CARD-2"], between=change)
    assert [d.reason for d in before] == [Reason.OK, Reason.OK]
    assert [(d.reason, d.backend_code) for d in after] == [(Reason.UNKNOWN, "invalid")] * 2
    assert "not active" in after[0].message and "expired" in after[1].message


def test_a_medium_of_two_tickets_on_the_list_is_ambiguous_offline_and_of_none_here_is_unknown(sim, paired):
    config = paired()
    one, two = sim.add_position(signed=False), sim.add_position(signed=False)
    sim.add_medium("FAMILY-7", [one, two])
    sim.add_medium("ELSEWHERE-8", ["a-ticket-of-another-event"])
    (decisions,) = _offline_scans(config, sim, ["FAMILY-7", "ELSEWHERE-8"])
    assert [(d.reason, d.backend_code) for d in decisions] == [(Reason.AMBIGUOUS, "ambiguous"),
                                                               (Reason.UNKNOWN, "invalid")]
    assert decisions[1].message == "Medium connected to other event"


@pytest.mark.parametrize("status", [403, 404])  # a device's profile; a pretix without reusable media
def test_a_device_not_allowed_to_read_media_syncs_the_rest_and_says_so_once(sim, paired, caplog, status):
    config = paired()
    ticket = sim.add_position(signed=False)
    sim.add_medium("CARD-9", [ticket])

    def refused(req):
        return Response(status, {"detail": "You do not have permission to perform this action."})

    sim.replace_route(sim.reusablemedia, refused)
    caplog.set_level(logging.INFO, logger="gated")
    first, second = _offline_scans(config, sim, ["CARD-9", ticket], between=lambda: None)  # two syncs
    assert [d.reason for d in first] == [Reason.UNKNOWN, Reason.OK]
    assert [d.reason for d in second] == [Reason.UNKNOWN, Reason.ALREADY_USED]
    assert caplog.text.count("does not let this device read reusable media") == 1


def test_a_failing_media_download_fails_the_sync(sim, paired):
    config = paired()
    sim.replace_route(sim.reusablemedia, lambda req: Response(400, {"detail": "Bad request"}))

    async def run():
        parts = await build(config)
        try:
            with pytest.raises(BackendRejected, match="reusable media: HTTP 400"):
                await parts.backend.sync(parts.store)
        finally:
            await parts.close()
    asyncio.run(run())


def test_a_card_whose_code_looks_like_a_damaged_signed_secret_is_still_found(sim, paired):
    # pretix's card codes are 24 characters of A-Z2-9; about 1 in 100 decode as the start of a signed
    # secret. pretix looks the code up; the signature check must not refuse it first.
    from gated.policy.pretix_sig1 import verify_sig1
    code = "APHDPD57ZWAMF7PTRZALWGQA"
    assert verify_sig1(code, []).reason is Reason.MALFORMED
    config = paired()
    sim.add_medium(code, [sim.add_position(signed=False)])
    (decisions,) = _offline_scans(config, sim, [code])
    assert decisions[0].reason is Reason.OK


def test_a_card_follows_its_ticket_to_a_new_secret_and_a_cancellation(sim, paired):
    config = paired()
    ticket = sim.add_position(signed=False)
    sim.add_medium("CARD-42", [ticket])

    def changed_in_pretix():
        new = sim.revoke(ticket)  # the ticket gets a new secret; its card is not "updated" in pretix
        sim.change(new, order_status="c")

    before, after = _offline_scans(config, sim, ["CARD-42"], between=changed_in_pretix)
    assert before[0].reason is Reason.OK
    assert (after[0].reason, after[0].backend_code) == (Reason.CANCELED, "canceled")


def test_a_card_finds_its_ticket_canceled_on_its_own_and_pretix_refuses_it_as_canceled(sim, paired):
    config = paired()
    ticket = sim.add_position(signed=False)
    sim.change(ticket, canceled=True)
    sim.add_medium("CARD-43", [ticket])
    (decisions,) = _offline_scans(config, sim, ["CARD-43"])
    assert (decisions[0].reason, decisions[0].backend_code) == (Reason.CANCELED, "canceled")


def test_a_card_of_more_tickets_than_gated_looks_at_is_not_decided_offline(sim, paired):
    config = paired()
    sim.add_medium("CARD-MANY", [sim.add_position(signed=False) for _ in range(40)])
    (decisions,) = _offline_scans(config, sim, ["CARD-MANY"])
    assert decisions[0].reason is Reason.AMBIGUOUS and "not decided offline" in decisions[0].message


def test_a_card_updated_in_a_shape_gated_cannot_read_is_never_active_offline(sim, paired):
    config = paired()
    sim.add_medium("CARD-44", [sim.add_position(signed=False)])

    def odd_update():
        sim.media[0].update(expires="next tuesday", updated=datetime.now(UTC))

    before, after = _offline_scans(config, sim, ["CARD-44"], between=odd_update)
    assert before[0].reason is Reason.OK
    assert (after[0].reason, after[0].backend_code) == (Reason.UNKNOWN, "invalid")


def test_a_refusal_on_upload_is_parked_with_pretixs_words_cut_whatever_their_type(sim, paired):
    # The parked reason is stored and logged: a server's 50 kB explanation or an object for a reason
    # must not reach either whole.
    config = paired()
    secret = sim.add_position(signed=False)
    original = sim.redeem

    def verbose(req):
        return Response(400, {"status": "error", "reason": {"nested": ["x"] * 1000},
                              "reason_explanation": "y" * 50_000, "require_attention": False, "checkin_texts": [],
                              "list": {"id": 1, "event": "democon"}, "position": {"id": 1, "attendee_name": "Ada"}})

    async def run():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            sim.fail_status = 503
            decision = await parts.gate.handle(Scan(token=secret, reader="front"))
            sim.fail_status = None
            sim.replace_route(original, verbose)
            rows = await parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans")))
            return decision, await parts.backend.upload(rows)
        finally:
            await parts.close()

    decision, result = asyncio.run(run())
    assert decision.admitted
    (why,) = result.parked.values()
    assert "pretix refused it even with force: " in why and 100 < len(why) < 1000
