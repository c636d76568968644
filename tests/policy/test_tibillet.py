"""TiBillet backend against the TiBillet simulator: pairing, online scans, offline signed codes, upload."""

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
from gated.simulators.tibillet import TibilletSim, make_code, public_pem
from gated.store import Store
from gated.upload import Uploader


@pytest.fixture(scope="module")
def keys():
    """RSA-2048 keys for two events, made once for the module (keygen is the slow part)."""
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture
def sim(keys):
    s = TibilletSim("/api/scan/")
    s.event = s.add_event("Concert", keys[0])
    s.other_event = s.add_event("Other show", keys[1])
    with s:
        yield s


@pytest.fixture
def tib(sim, keys, load_config, tmp_path):
    """Config for the simulator; the Concert's public key is configured for offline checks."""
    pem = tmp_path / "concert.pem"
    pem.write_bytes(public_pem(keys[0]))

    def make(extra_backend: str = "", extra: str = "", prefix: str = "/api/scan/"):
        return load_config(f"""
            [backend]
            type = "tibillet"
            url = "{sim.url}"
            timeout_seconds = 2.0
            [backend.tibillet]
            path_prefix = "{prefix}"
            public_keys = ["{pem}"]
            {extra_backend}
            {extra}
        """)
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


# --- pairing ------------------------------------------------------------------------------------


def test_pair_stores_the_api_key_in_the_owner_only_store_and_prints_the_device_name(sim, tib, capsys):
    config = tib()
    code = sim.new_device("North gate 3")
    rc, out, _ = _pair(config, code, capsys)
    assert rc == 0 and 'device "North gate 3"' in out and "tenant 'Example Organization'" in out
    (api_key,) = sim.keys
    assert _kv(config, "tibillet:api_key") == api_key and api_key not in out
    assert stat.S_IMODE(os.stat(config.store.path).st_mode) == 0o600
    assert sim.requests[0].path == f"/api/scan/{code}/pair"


def test_a_pairing_code_works_once(sim, tib, capsys):
    config = tib()
    code = sim.new_device()
    assert _pair(config, code, capsys)[0] == 0
    rc, _, err = _pair(config, code, capsys)
    assert rc == 2 and "refused the pairing code (HTTP 400" in err and "single-use" in err


def test_wrong_path_prefix_is_named_when_pairing_fails(sim, tib, capsys):
    rc, _, err = _pair(tib(prefix="/scan/"), sim.new_device(), capsys)
    assert rc == 2 and "path_prefix" in err


# --- online ------------------------------------------------------------------------------------


@pytest.fixture
def paired(sim, tib, capsys):
    def make(**kw):
        config = tib(**kw)
        assert _pair(config, sim.new_device(), capsys)[0] == 0
        return config
    return make


def test_online_entry_admits_once_then_says_already_used(sim, paired):
    config = paired()
    ticket_uuid, code = sim.issue(sim.event, "Ada", "Lovelace")
    config.lane["debounce_seconds"] = 0.0
    first, second = asyncio.run(_scan(config, code, code))
    assert (first.verdict, first.reason, first.source) == (Verdict.ADMIT, Reason.OK, Source.ONLINE)
    assert first.message == "Ada Lovelace" and first.ticket_key == ticket_uuid and first.event_id == "Concert"
    assert (second.reason, second.message) == (Reason.ALREADY_USED, "Ada Lovelace")
    assert len(sim.scans) == 1
    auth = sim.requests[-1].headers["authorization"]
    assert auth == f"Api-Key {next(iter(sim.keys))}"


def test_online_refusals_each_get_their_reason(sim, paired, keys):
    config = paired()
    _, code = sim.issue(sim.event)
    data, sig = code.split(":")
    unknown = make_code(keys[0], "00000000-0000-0000-0000-000000000000")
    tampered = f"{data}:{sig[:50]}{'A' if sig[50] != 'A' else 'B'}{sig[51:]}"
    decisions = asyncio.run(_scan(config, unknown, tampered, "not-a-tibillet-code"))
    assert [d.reason for d in decisions] == [Reason.UNKNOWN, Reason.INVALID_SIGNATURE, Reason.MALFORMED]
    assert all(d.source is Source.ONLINE for d in decisions)
    assert decisions[0].backend_code == "404 Ticket not found"


def test_ticket_of_another_event_is_wrong_event_when_event_uuid_is_set(sim, paired):
    config = paired(extra_backend=f'event_uuid = "{sim.event}"')
    _, code = sim.issue(sim.other_event)
    (d,) = asyncio.run(_scan(config, code))
    assert d.reason is Reason.WRONG_EVENT and d.source is Source.ONLINE
    assert sim.requests[-1].json() == {"qrcode_data": code, "event_uuid": sim.event}


def test_exit_scan_asks_check_ticket_and_leaves_the_ticket_unscanned(sim, paired):
    config = paired()
    _, code = sim.issue(sim.event, "Bob", "Marley")
    (d,) = asyncio.run(_scan(config, code, mode=ScanMode.EXIT))
    assert d.verdict is Verdict.ADMIT and d.message == "Bob Marley"
    assert sim.requests[-1].path == "/api/scan/check_ticket/" and sim.scans == []


def test_scan_api_under_the_english_spec_prefix(keys, load_config, capsys):
    with TibilletSim("/scan/") as sim:
        event = sim.add_event("Concert", keys[0])
        config = load_config(f'[backend]\ntype = "tibillet"\nurl = "{sim.url}"\ntimeout_seconds = 2.0\n'
                             '[backend.tibillet]\npath_prefix = "scan"\n')
        assert _pair(config, sim.new_device(), capsys)[0] == 0
        (d,) = asyncio.run(_scan(config, sim.issue(event)[1]))
        assert d.reason is Reason.OK and sim.requests[-1].path == "/scan/ticket/"


def test_lookup_shows_the_ticket_without_scanning_it(sim, paired, capsys):
    config = paired()
    _, code = sim.issue(sim.event, "Cy", "Young")
    assert cli.main(["lookup", "--config", config.path, code]) == 0
    out = capsys.readouterr().out
    assert "first_name: Cy" in out and "is_scanned: False" in out and sim.scans == []
    assert code not in out


# --- offline -----------------------------------------------------------------------------------


def test_unpaired_gate_decides_offline_from_the_signature_and_keys_anti_passback_by_uuid(sim, tib, keys):
    config = tib()
    config.lane["debounce_seconds"] = 0.0
    ticket_uuid, code = sim.issue(sim.event)
    same_ticket_other_text = make_code(keys[0], ticket_uuid, padding=False)
    assert same_ticket_other_text != code
    first, second = asyncio.run(_scan(config, code, same_ticket_other_text))
    assert (first.verdict, first.source, first.ticket_key) == (Verdict.ADMIT, Source.OFFLINE, ticket_uuid)
    assert "not paired" in first.detail and first.event_id == "concert"
    assert second.reason is Reason.ALREADY_USED
    assert not any(r.path.endswith("/ticket/") for r in sim.requests)


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


def test_no_event_keys_means_the_offline_fallback_decides(sim, load_config):
    config = load_config(f'[backend]\ntype = "tibillet"\nurl = "{sim.url}"\n[offline]\nfallback = "deny"\n')
    (d,) = asyncio.run(_scan(config, sim.issue(sim.event)[1]))
    assert d.reason is Reason.OFFLINE_NO_DATA and not d.admitted


def test_refused_api_key_decides_offline_and_says_to_pair_again(sim, paired):
    config = paired()
    sim.keys.clear()  # the device was archived in the admin
    (d,) = asyncio.run(_scan(config, sim.issue(sim.event)[1]))
    assert d.source is Source.OFFLINE and d.admitted and "pair again" in d.detail


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
        replays = [r for r in sim.requests[mark:] if r.path == "/api/scan/ticket/"]
        return decisions, (first, second, stats), replays
    finally:
        await parts.close()


def test_offline_entries_are_replayed_once_when_the_api_is_back(sim, paired):
    config = paired()
    (u1, c1), (u2, c2) = sim.issue(sim.event), sim.issue(sim.event)
    _, other = sim.issue(sim.other_event)
    decisions, (first, second, stats), replays = asyncio.run(_offline_then_upload(config, sim, [c1, c2, other]))
    assert [d.admitted for d in decisions] == [True, True, False]
    device = next(iter(sim.keys.values()))
    assert sorted(sim.scans) == sorted([(device, u1), (device, u2)])
    assert (first, second, stats.pending, stats.parked) == (3, 0, 0, 0)  # the deny is done without a request
    assert sorted(r.json()["qrcode_data"] for r in replays) == sorted([c1, c2])


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
        sim.tickets[ticket_uuid].scanned_by = "another-device"

    _, (first, _, stats), _ = asyncio.run(_offline_then_upload(config, sim, [code], between=scanned_elsewhere))
    assert (first, stats.parked) == (0, 1)
    store = Store(config.store.path)
    try:
        (row,) = store.parked()
    finally:
        store.close()
    assert "another device" in row["upload_error"] and code not in row["upload_error"]


def test_server_that_wants_the_event_uuid_is_not_taken_for_a_ticket_refusal(sim, paired):
    sim.require_event_uuid = True
    config = paired()
    (d,) = asyncio.run(_scan(config, sim.issue(sim.event)[1]))
    assert d.source is Source.OFFLINE and d.admitted and "event_uuid" in d.detail
