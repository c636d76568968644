"""TiBillet backend against the TiBillet simulator, which answers as the real server (Lespass) does.

Pairing from the site's URL alone, the health check, online verdicts per ticket status (the real
`ticket/` would scan a canceled ticket), offline signed codes and downloaded statuses, uploads.
tests/test_real_tibillet.py runs the same against the real server, by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gated import cli
from gated.daemon import build
from gated.model import Reason, Scan, ScanMode, Source, Verdict
from gated.policy.tibillet import KeyRefused
from gated.simulators.base import Response
from gated.simulators.tibillet import CANCELED, CREATED, INACTIVE, SCANNED, VALID, TibilletSim, make_code, public_pem
from gated.store import Store
from gated.upload import Uploader


@pytest.fixture(scope="module")
def keys():
    """RSA-2048 keys for two events, made once for the module (keygen is the slow part)."""
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def _sim(keys, *args, **kw) -> TibilletSim:
    s = TibilletSim(*args, **kw)
    s.event = s.add_event("Concert", keys[0])
    s.other_event = s.add_event("Other show", keys[1])
    return s


@pytest.fixture
def sim(keys):
    with _sim(keys) as s:
        yield s


@pytest.fixture
def tib(sim, keys, load_config, tmp_path):
    """Config for the simulator as an installer writes it: the site's URL, the event, its public key."""
    pem = tmp_path / "concert.pem"
    pem.write_bytes(public_pem(keys[0]))

    def make(extra_backend: str = "", extra: str = "", event: str | None = None, url: str | None = None,
             pems: list | None = None):
        event = sim.event if event is None else event
        files = ", ".join(f'"{p}"' for p in (pem,) if pems is None) or ", ".join(f'"{p}"' for p in pems)
        config = load_config(f"""
            [backend]
            type = "tibillet"
            url = "{url or sim.url}"
            timeout_seconds = 2.0
            [backend.tibillet]
            public_keys = [{files}]
            event_uuid = "{event}"
            {extra_backend}
            {extra}
        """)
        config.lane["debounce_seconds"] = 0.0
        return config
    return make


def _pair(config, code, capsys) -> tuple[int, str, str]:
    rc = cli.main(["pair", "--config", config.path, code])
    out, err = capsys.readouterr()
    return rc, out, err


async def _scan(config, *tokens, mode=None, before=None):
    parts = await build(config)
    try:
        if mode is not None:
            parts.gate.scan_mode = mode
        if before is not None:
            await before(parts)
        out = [await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens]
        await parts.gate.drain()
        return out
    finally:
        await parts.close()


def _kv(config, key):
    store = Store(config.store.path)
    try:
        return store.get(key)
    finally:
        store.close()


def _paths(sim, since: int = 0) -> list[str]:
    return [f"{r.method} {r.path}" for r in sim.requests[since:]]


# --- pairing ------------------------------------------------------------------------------------


def test_pair_finds_the_scan_api_from_the_site_url_alone_and_says_where(sim, tib, capsys):
    config = tib()
    code = sim.new_device("North gate 3")
    rc, out, _ = _pair(config, code, capsys)
    assert rc == 0 and 'device "North gate 3"' in out and "(Example Organization)" in out
    assert f"scan API at {sim.url}/scan/ (found)" in out
    assert 'health check: the new key is accepted as device "North gate 3"' in out
    (api_key,) = sim.keys
    assert _kv(config, "tibillet:api_key") == api_key and api_key not in out and code not in out
    assert _kv(config, "tibillet:path_prefix") == "/scan/"
    assert stat.S_IMODE(os.stat(config.store.path).st_mode) == 0o600
    assert _paths(sim) == [f"GET /scan/{code}/pair/", "GET /scan/check_api_scan/"]


def test_pair_prints_names_from_the_server_escaped(sim, tib, capsys):
    config = tib()
    code = sim.new_device("Gate\x1b[2J\nNorth")  # a device name typed in the admin reaches the terminal
    rc, out, _ = _pair(config, code, capsys)
    assert rc == 0 and "\x1b" not in out and 'device "Gate\\x1b[2J\\x0aNorth"' in out


def test_pair_finds_the_api_under_the_french_document_prefix_and_scans_there(keys, tib, load_config, capsys):
    with _sim(keys, "/api/scan/") as other:
        config = tib(url=other.url, event=other.event)
        rc, out, _ = _pair(config, other.new_device(), capsys)
        assert rc == 0 and f"scan API at {other.url}/api/scan/ (found)" in out
        (d,) = asyncio.run(_scan(config, other.issue(other.event)[1]))
    assert d.reason is Reason.OK and d.source is Source.ONLINE
    assert _paths(other)[-2:] == ["POST /api/scan/check_ticket/", "POST /api/scan/ticket/"]


def test_pair_takes_the_admin_pairing_link_as_the_code(sim, tib, capsys):
    config = tib()
    code = sim.new_device()
    rc, out, _ = _pair(config, f"https://tickets.example.org/scan/{code}/pair", capsys)
    assert rc == 0 and "paired with TiBillet" in out


def test_a_pairing_code_works_once(sim, tib, capsys):
    config = tib()
    code = sim.new_device()
    assert _pair(config, code, capsys)[0] == 0
    rc, _, err = _pair(config, code, capsys)
    assert rc == 2 and "refused the pairing code (HTTP 400: No ScanApp matches the given query.)" in err
    assert "single-use" in err


def test_a_site_without_the_scan_api_names_every_place_tried(sim, tib, capsys):
    rc, _, err = _pair(tib(url=f"{sim.url}/shop"), sim.new_device(), capsys)
    assert rc == 2 and "no TiBillet scan API under" in err and "path_prefix" in err
    assert "/scan/…/pair/ HTTP 404" in err and "/api/scan/…/pair HTTP 404" in err


def test_path_prefix_overrides_the_search(sim, tib, capsys):
    config = tib(extra_backend='path_prefix = "api/scan"')
    rc, _, err = _pair(config, sim.new_device(), capsys)
    assert rc == 2 and all(p.startswith("GET /api/scan/") for p in _paths(sim))


def test_pair_says_when_the_key_in_api_key_file_is_refused(sim, tib, tmp_path, capsys):
    key = tmp_path / "tibillet.key"
    key.write_text("AAAAAAAA.wrongwrongwrongwrongwrongwrongwr\n")
    key.chmod(0o600)
    rc, _, err = _pair(tib(extra_backend=f'api_key_file = "{key}"'), sim.new_device(), capsys)
    assert rc == 2 and "refuses the key in api_key_file" in err and "HTTP 500" in err


# --- health check -----------------------------------------------------------------------------


@pytest.fixture
def paired(sim, tib, capsys):
    def make(**kw):
        config = tib(**kw)
        assert _pair(config, sim.new_device(), capsys)[0] == 0
        return config
    return make


async def _probe(config):
    parts = await build(config)
    try:
        await parts.backend.probe()
        return parts.backend
    finally:
        await parts.close()


def test_health_check_is_check_api_scan(sim, paired):
    config = paired()
    mark = len(sim.requests)
    asyncio.run(_probe(config))
    assert "GET /scan/check_api_scan/" in _paths(sim, mark) and "GET /scan/test_api/" not in _paths(sim, mark)


def test_health_check_falls_back_to_test_api_where_only_the_documents_one_exists(keys, tib, capsys):
    with _sim(keys, test_api=True) as documented:
        config = tib(url=documented.url, event=documented.event)
        assert _pair(config, documented.new_device(), capsys)[0] == 0
        asyncio.run(_probe(config))
        assert _paths(documented)[-2:] == ["GET /scan/check_api_scan/", "GET /scan/test_api/"]


def test_an_unknown_key_is_named_refused_not_taken_for_a_dead_server(sim, paired, caplog):
    config = paired()
    sim.keys.clear()  # the device was deleted in the admin: the key is unknown, TiBillet answers 500
    with pytest.raises(KeyRefused, match="API key refused .*HTTP 500.*gated pair"):
        asyncio.run(_probe(config))
    assert any("refused the API key" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_an_archived_device_is_named_refused(sim, paired):
    config = paired()
    sim.archived.update(sim.keys.values())
    with pytest.raises(KeyRefused, match=r"HTTP 403: App is archived"):
        asyncio.run(_probe(config))


# --- online ------------------------------------------------------------------------------------


def test_online_entry_admits_a_valid_ticket_once_then_says_already_used(sim, paired):
    config = paired()
    ticket_uuid, code = sim.issue(sim.event, "Ada", "Lovelace")
    mark = len(sim.requests)
    first, second = asyncio.run(_scan(config, code, code))
    assert (first.verdict, first.reason, first.source) == (Verdict.ADMIT, Reason.OK, Source.ONLINE)
    assert first.message == "Ada Lovelace" and first.ticket_key == ticket_uuid and first.event_id == "Concert"
    assert (second.reason, second.message) == (Reason.ALREADY_USED, "Ada Lovelace")
    assert len(sim.scans) == 1
    scan = [r for r in sim.requests[mark:] if r.path == "/scan/ticket/"]
    assert len(scan) == 1 and scan[0].json() == {"qrcode_data": code, "event_uuid": sim.event}
    assert scan[0].headers["authorization"] == f"Api-Key {next(iter(sim.keys))}"


@pytest.mark.parametrize(("status", "reason"), [(CANCELED, Reason.CANCELED), (INACTIVE, Reason.REJECTED),
                                                (CREATED, Reason.NOT_PAID), (SCANNED, Reason.ALREADY_USED)])
@pytest.mark.parametrize("language", ["en", "fr"])
def test_a_ticket_whose_status_is_not_valid_is_denied_online_and_not_marked_scanned(keys, tib, capsys, status,
                                                                                    reason, language):
    with _sim(keys, language=language) as s:
        config = tib(url=s.url, event=s.event)
        assert _pair(config, s.new_device(), capsys)[0] == 0
        ticket_uuid, code = s.issue(s.event, "Carl", "Canceled", status)
        mark = len(s.requests)
        (d,) = asyncio.run(_scan(config, code))
        assert (d.verdict, d.reason, d.source) == (Verdict.DENY, reason, Source.ONLINE)
        assert d.message == "Carl Canceled" and d.ticket_key == ticket_uuid
        assert s.status(ticket_uuid) == status and s.scans == []
        assert "POST /scan/ticket/" not in _paths(s, mark)


def test_a_french_server_admits_its_valid_tickets(keys, tib, capsys):
    with _sim(keys, language="fr") as s:
        config = tib(url=s.url, event=s.event)
        assert _pair(config, s.new_device(), capsys)[0] == 0
        ticket_uuid, code = s.issue(s.event)
        (d,) = asyncio.run(_scan(config, code))
        assert d.reason is Reason.OK and d.backend_code == "200 Ticket successfully scanned"
        assert s.status(ticket_uuid) == SCANNED


def test_online_refusals_each_get_their_reason_and_scan_nothing(sim, paired, keys):
    config = paired()
    _, code = sim.issue(sim.event)
    other_uuid, other = sim.issue(sim.other_event)
    data, sig = code.split(":")
    unknown = make_code(keys[0], "00000000-0000-0000-0000-000000000000")
    forged = f"{data}:{sig[:50]}{'A' if sig[50] != 'A' else 'B'}{sig[51:]}"
    decisions = asyncio.run(_scan(config, unknown, forged, "not-a-tibillet-code", other))
    assert [d.reason for d in decisions] == [Reason.UNKNOWN, Reason.INVALID_SIGNATURE, Reason.MALFORMED,
                                             Reason.WRONG_EVENT]
    assert all(d.source is Source.ONLINE and not d.admitted for d in decisions)
    assert [d.backend_code for d in decisions] == ["404 Ticket not found", "400 Invalid ticket signature",
                                                   "400 Invalid QR code format", "406 Event error"]
    assert sim.scans == [] and sim.status(other_uuid) == VALID


def test_exit_scan_asks_check_ticket_only_and_leaves_the_ticket_unscanned(sim, paired):
    config = paired()
    _, code = sim.issue(sim.event, "Bob", "Marley")
    mark = len(sim.requests)
    (d,) = asyncio.run(_scan(config, code, mode=ScanMode.EXIT))
    assert d.verdict is Verdict.ADMIT and d.message == "Bob Marley"
    assert _paths(sim, mark)[-1] == "POST /scan/check_ticket/" and sim.scans == []


def test_without_event_uuid_entries_are_decided_offline_naming_the_key_to_set(sim, paired):
    config = paired(event="")
    (d,) = asyncio.run(_scan(config, sim.issue(sim.event)[1]))
    assert d.source is Source.OFFLINE and d.admitted and "event_uuid" in d.detail and sim.scans == []


@pytest.mark.parametrize("status", [405, 409, 413, 429])
def test_a_4xx_that_is_not_about_the_ticket_decides_offline(sim, paired, status):
    # Only 400/404/406 are TiBillet's words about a ticket; a throttled or refused request is
    # DRF's ({"detail": ...}) and says nothing of it: the valid ticket must not be refused online.
    config = paired()
    _, code = sim.issue(sim.event)
    original = sim.check_ticket
    sim.replace_route(original, lambda req: Response(status, {"detail": "Request was throttled."}))
    (d,) = asyncio.run(_scan(config, code))
    assert (d.verdict, d.source) == (Verdict.ADMIT, Source.OFFLINE) and f"HTTP {status}" in d.detail
    assert sim.scans == []


def test_lookup_shows_the_ticket_without_scanning_it(sim, paired, capsys):
    config = paired()
    _, code = sim.issue(sim.event, "Cy", "Young", CANCELED)
    assert cli.main(["lookup", "--config", config.path, code]) == 0
    out = capsys.readouterr().out
    assert "first_name: Cy" in out and "status: Canceled" in out and sim.scans == []
    assert code not in out


def test_lookup_prints_the_servers_words_escaped(sim, paired, capsys):
    # A name from the server reaches the terminal: an escape sequence in it must not act there.
    config = paired()
    _, code = sim.issue(sim.event, "Cy\x1b]0;owned\x07", "Young\nforged line", VALID)
    assert cli.main(["lookup", "--config", config.path, code]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\nforged line" not in out
    assert "first_name: Cy\\x1b]0;owned\\x07" in out


def test_lookup_of_a_refused_code_prints_the_servers_words_not_its_body(sim, paired, capsys):
    # An error answer may echo what was sent; the token must not reach the terminal through it.
    config = paired()
    _, code = sim.issue(sim.event)
    sim.replace_route(sim.check_ticket, lambda req: Response(400, {"error": "Invalid QR code format",
                                                                   "qrcode_data": req.json()["qrcode_data"]}))
    assert cli.main(["lookup", "--config", config.path, code]) == 0
    out = capsys.readouterr().out
    assert "HTTP 400: Invalid QR code format" in out and code not in out


# --- offline -----------------------------------------------------------------------------------


def test_unpaired_gate_decides_offline_from_the_signature_and_keys_anti_passback_by_uuid(sim, tib, keys):
    config = tib()
    ticket_uuid, code = sim.issue(sim.event)
    same_ticket_other_text = make_code(keys[0], ticket_uuid, padding=False)
    assert same_ticket_other_text != code
    first, second = asyncio.run(_scan(config, code, same_ticket_other_text))
    assert (first.verdict, first.source, first.ticket_key) == (Verdict.ADMIT, Source.OFFLINE, ticket_uuid)
    assert "not paired" in first.detail and first.event_id == "concert"
    assert second.reason is Reason.ALREADY_USED
    assert sim.requests == []


def test_offline_codes_are_checked_by_signature_when_the_api_fails(sim, paired, keys):
    config = paired()
    sim.fail_status = 503
    _, good = sim.issue(sim.event)
    _, other_event = sim.issue(sim.other_event)
    data, sig = good.split(":")
    tampered = f"{data[:20]}{'A' if data[20] != 'A' else 'B'}{data[21:]}:{sig}"
    decisions = asyncio.run(_scan(config, good, tampered, f"{data}:{sig[:-30]}", other_event))
    assert [d.reason for d in decisions] == [Reason.OK, Reason.INVALID_SIGNATURE, Reason.MALFORMED,
                                             Reason.INVALID_SIGNATURE]
    assert all(d.source is Source.OFFLINE for d in decisions) and "HTTP 503" in decisions[0].detail


async def _sync_then_offline(config, sim, tokens, mode=ScanMode.ENTRY):
    parts = await build(config)
    try:
        await parts.backend.sync(parts.store)
        sim.fail_status = 503
        parts.gate.scan_mode = mode
        return [await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens]
    finally:
        sim.fail_status = None
        await parts.close()


def test_downloaded_statuses_deny_canceled_unpaid_inactive_and_scanned_tickets_offline(sim, paired):
    config = paired()
    codes = {status: sim.issue(sim.event, "Dee", status, status) for status in (VALID, CANCELED, CREATED,
                                                                               INACTIVE, SCANNED)}
    for i in range(250):  # more than one page of list_tickets (200 a page)
        sim.issue(sim.event, "Filler", str(i))
    decisions = asyncio.run(_sync_then_offline(config, sim, [code for _, code in codes.values()]))
    assert [(d.verdict, d.reason) for d in decisions] == [
        (Verdict.ADMIT, Reason.OK), (Verdict.DENY, Reason.CANCELED), (Verdict.DENY, Reason.NOT_PAID),
        (Verdict.DENY, Reason.REJECTED), (Verdict.DENY, Reason.ALREADY_USED)]
    assert all(d.source is Source.OFFLINE for d in decisions)
    assert decisions[0].message == "Dee K" and "canceled in TiBillet's list" in decisions[1].message
    lists = [r.json() for r in sim.requests if r.path == "/scan/list_tickets/"]
    assert [x["page"] for x in lists] == [1, 2] and all(x["event_uuid"] == sim.event for x in lists)


def test_a_listed_ticket_in_an_odd_shape_costs_that_ticket_not_the_download(sim, paired):
    config = paired()
    codes = {status: sim.issue(sim.event, "Dee", status, status) for status in (VALID, CANCELED)}
    odd_name, odd_status = sim.issue(sim.event, "Odd", "Name"), sim.issue(sim.event, "Odd", "Status")
    original = sim.list_tickets

    def odd(req):
        answer = original(req)
        for item in answer.body["results"]:
            if item["uuid"] == odd_name[0]:
                item["first_name"] = ["not", "text"]
            elif item["uuid"] == odd_status[0]:
                item["status"] = {"display": "Valid"}
        answer.body["results"] += [17, None, {"uuid": ["x"], "status": "Valid"}, {"status": "Valid"}]
        return answer

    sim.replace_route(original, odd)
    decisions = asyncio.run(_sync_then_offline(config, sim, [codes[VALID][1], codes[CANCELED][1], odd_name[1],
                                                             odd_status[1]]))
    assert [(d.verdict, d.reason) for d in decisions] == [
        (Verdict.ADMIT, Reason.OK), (Verdict.DENY, Reason.CANCELED),  # the download was taken
        (Verdict.ADMIT, Reason.OK),  # a name gated cannot read is left out
        (Verdict.DENY, Reason.REJECTED)]  # a status gated cannot read never admits
    assert decisions[2].message == "Name" and "unknown:(unreadable)" in decisions[3].message


def test_a_ticket_of_another_configured_event_is_wrong_event_offline_as_it_is_online(sim, paired, keys, tmp_path):
    # Both events' keys are configured (the installer's list of the festival's events), the lane admits one.
    concert, other = tmp_path / "concert.pem", tmp_path / "other-show.pem"
    other.write_bytes(public_pem(keys[1]))
    config = paired(pems=[other, concert])
    _, mine = sim.issue(sim.event)
    _, theirs = sim.issue(sim.other_event)
    (online,) = asyncio.run(_scan(config, theirs))
    entries = asyncio.run(_sync_then_offline(config, sim, [mine, theirs]))
    (leaving,) = asyncio.run(_sync_then_offline(config, sim, [theirs], mode=ScanMode.EXIT))
    assert online.reason is Reason.WRONG_EVENT
    assert [(d.reason, d.source) for d in entries] == [(Reason.OK, Source.OFFLINE),
                                                       (Reason.WRONG_EVENT, Source.OFFLINE)]
    assert "a ticket of other-show" in entries[1].message
    assert leaving.admitted  # TiBillet has no exits: any ticket it knows may leave


def test_a_listed_code_of_another_ticket_teaches_nothing_and_the_events_tickets_still_pass(sim, paired, keys,
                                                                                             tmp_path):
    other = tmp_path / "other-show.pem"
    other.write_bytes(public_pem(keys[1]))
    config = paired(pems=[other, tmp_path / "concert.pem"])
    _, mine = sim.issue(sim.event)
    sim.issue(sim.event)
    _, foreign = sim.issue(sim.other_event)
    original = sim.list_tickets

    def odd(req):  # a list whose first entry carries another event's code under its own uuid
        answer = original(req)
        answer.body["results"][0]["qrcode_data"] = foreign
        return answer

    sim.replace_route(original, odd)
    decisions = asyncio.run(_sync_then_offline(config, sim, [mine, foreign]))
    assert [d.reason for d in decisions] == [Reason.OK, Reason.WRONG_EVENT]


def test_a_key_replaced_after_the_last_sync_does_not_make_every_ticket_another_events(sim, paired, keys, tmp_path):
    config = paired()
    sim.issue(sim.event)
    asyncio.run(_sync_then_offline(config, sim, []))  # learns the event's key
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sim.events[sim.event] = (sim.events[sim.event][0], new_key)  # the event's key rotated in TiBillet
    (tmp_path / "concert.pem").write_bytes(public_pem(new_key))  # and on the gate; no sync since
    _, fresh = sim.issue(sim.event)

    async def offline():
        parts = await build(config)
        try:
            sim.fail_status = 503
            return await parts.gate.handle(Scan(token=fresh, reader="front"))
        finally:
            sim.fail_status = None
            await parts.close()

    assert asyncio.run(offline()).reason is Reason.OK


def test_a_lane_without_its_events_key_says_so_at_sync(sim, paired, keys, tmp_path, caplog):
    other = tmp_path / "other-show.pem"
    other.write_bytes(public_pem(keys[1]))
    config = paired(pems=[other])
    _, mine = sim.issue(sim.event)
    (d,) = asyncio.run(_sync_then_offline(config, sim, [mine]))
    assert d.reason is Reason.INVALID_SIGNATURE
    assert "none of [backend.tibillet] public_keys signs the tickets of event" in caplog.text


def test_a_canceled_ticket_may_still_leave_offline(sim, paired):
    config = paired()
    _, code = sim.issue(sim.event, status=CANCELED)
    (d,) = asyncio.run(_sync_then_offline(config, sim, [code], mode=ScanMode.EXIT))
    assert d.admitted and d.source is Source.OFFLINE


def test_data_age_is_the_downloaded_statuses_age(sim, paired):
    config = paired()

    async def run():
        parts = await build(config)
        try:
            before = await parts.store.call(parts.backend.statuses, 0.0)
            await parts.backend.sync(parts.store)
            import time
            now = time.time() + 100
            return before, await parts.store.call(parts.backend.statuses, now), \
                await parts.store.call(parts.backend.data_age, now)
        finally:
            await parts.close()

    sim.issue(sim.event)
    before, (tickets, age), data_age = asyncio.run(run())
    assert before is None and tickets == 1 and 99 < age < 110 and data_age == age


def test_no_event_keys_means_the_offline_fallback_decides(sim, load_config):
    config = load_config(f'[backend]\ntype = "tibillet"\nurl = "{sim.url}"\n[offline]\nfallback = "deny"\n')
    (d,) = asyncio.run(_scan(config, sim.issue(sim.event)[1]))
    assert d.reason is Reason.OFFLINE_NO_DATA and not d.admitted


def test_key_file_that_is_not_an_rsa_public_key_is_logged_and_skipped(sim, load_config, tmp_path, caplog):
    bad = tmp_path / "broken.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    config = load_config(f'[backend]\ntype = "tibillet"\nurl = "{sim.url}"\n'
                         f'[backend.tibillet]\npublic_keys = ["{bad}"]\n')
    caplog.set_level(logging.ERROR)
    asyncio.run(_scan(config))
    assert any("broken.pem" in r.getMessage() and "cannot be checked offline" in r.getMessage()
               for r in caplog.records)


# --- upload ------------------------------------------------------------------------------------


async def _offline_then_upload(config, sim, tokens, between=None):
    """Scan with the API failing, then bring it back and drain the queue twice."""
    parts = await build(config)
    try:
        sim.fail_status = 503
        decisions = [await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens]
        sim.fail_status = None
        if between is not None:
            between()
        mark = len(sim.requests)
        uploader = Uploader(parts.backend, parts.store)
        first = await uploader.drain()
        stats = await parts.store.call(Store.queue_stats)
        second = await uploader.drain()
        replays = [r for r in sim.requests[mark:] if r.path == "/scan/ticket/"]
        return decisions, (first, second, stats), replays
    finally:
        await parts.close()


def test_offline_entries_are_replayed_once_with_the_event_when_the_api_is_back(sim, paired):
    config = paired()
    (u1, c1), (u2, c2) = sim.issue(sim.event), sim.issue(sim.event)
    _, other = sim.issue(sim.other_event)
    decisions, (first, second, stats), replays = asyncio.run(_offline_then_upload(config, sim, [c1, c2, other]))
    assert [d.admitted for d in decisions] == [True, True, False]
    device = next(iter(sim.keys.values()))
    assert sorted(sim.scans) == sorted([(device, u1), (device, u2)])
    assert (first, second, stats.pending, stats.parked) == (3, 0, 0, 0)  # the deny is done without a request
    assert sorted(r.json()["qrcode_data"] for r in replays) == sorted([c1, c2])
    assert all(r.json()["event_uuid"] == sim.event for r in replays)


def test_a_ticket_canceled_while_offline_is_parked_not_replayed_and_stays_canceled(sim, paired):
    config = paired()
    ticket_uuid, code = sim.issue(sim.event)

    def canceled_meanwhile():
        sim.tickets[ticket_uuid].status = CANCELED

    (d,), (first, _, stats), replays = asyncio.run(_offline_then_upload(config, sim, [code],
                                                                        between=canceled_meanwhile))
    assert d.admitted and (first, stats.parked) == (0, 1) and replays == []
    assert sim.status(ticket_uuid) == CANCELED and sim.scans == []
    store = Store(config.store.path)
    try:
        (row,) = store.parked()
    finally:
        store.close()
    assert "not replayed: the ticket is Canceled" in row["upload_error"] and code not in row["upload_error"]


def test_replay_whose_answer_was_lost_is_counted_once_on_retry(sim, paired):
    config = paired()
    config.backend["timeout_seconds"] = 0.3

    async def run():
        parts = await build(config)
        try:
            ticket_uuid, code = sim.issue(sim.event)
            sim.fail_status = 503
            await parts.gate.handle(Scan(token=code, reader="front"))
            sim.fail_status = None
            parts.backend.slow_seconds = 0.3  # uploads normally wait 10 s for an answer
            sim.hold_answer.set()  # the server records the scan, the answer never arrives
            uploader = Uploader(parts.backend, parts.store)
            lost = await asyncio.wait_for(uploader.drain(), 30)
            sim.hold_answer.clear()
            retried = await uploader.drain()
            return ticket_uuid, lost, retried, await parts.store.call(Store.queue_stats)
        finally:
            sim.hold_answer.clear()
            await parts.close()

    ticket_uuid, lost, retried, stats = asyncio.run(run())
    assert (lost, retried, stats.pending, stats.parked) == (0, 1, 0, 0)
    assert [u for _, u in sim.scans] == [ticket_uuid]


def test_ticket_scanned_meanwhile_by_another_device_is_parked_not_dropped(sim, paired):
    config = paired()
    ticket_uuid, code = sim.issue(sim.event)

    def scanned_elsewhere():
        sim.tickets[ticket_uuid].status = SCANNED
        sim.tickets[ticket_uuid].scanned_by = "another-device"

    _, (first, _, stats), _ = asyncio.run(_offline_then_upload(config, sim, [code], between=scanned_elsewhere))
    assert (first, stats.parked) == (0, 1)
    store = Store(config.store.path)
    try:
        (row,) = store.parked()
    finally:
        store.close()
    assert "another device" in row["upload_error"] and code not in row["upload_error"]


@pytest.mark.parametrize("route, body", [("check_ticket", {"error": "Slow down"}),
                                         ("ticket", {"detail": "Request was throttled."})])
def test_a_throttled_replay_waits_instead_of_being_parked(sim, paired, route, body):
    # An offline admission parked for a 429 would never reach TiBillet's count.
    config = paired()
    _, code = sim.issue(sim.event)
    original = getattr(sim, route)

    def throttle_then_answer():
        sim.replace_route(original, lambda req: Response(429, body))

    _, (first, _, stats), _ = asyncio.run(_offline_then_upload(config, sim, [code], between=throttle_then_answer))
    assert (first, stats.pending, stats.parked) == (0, 1, 0) and sim.scans == []


def test_uploads_without_event_uuid_wait_instead_of_being_parked(sim, paired):
    config = paired(event="")
    _, code = sim.issue(sim.event)
    _, (first, _, stats), _ = asyncio.run(_offline_then_upload(config, sim, [code]))
    assert (first, stats.pending, stats.parked) == (0, 1, 0) and sim.scans == []
