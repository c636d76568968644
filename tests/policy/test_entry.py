"""The entry backend end to end: gated's own pipeline against the Entry V1 simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gated import __version__, cli, device
from gated.daemon import build
from gated.errors import ConfigError
from gated.model import InputKind, Reason, Scan, ScanMode, Source, Verdict
from gated.policy.entry import JWT_KEY
from gated.policy.entry_data import map_reason
from gated.simulators.entry import EntrySimulator, SimTicket
from gated.store import Store
from gated.upload import Uploader

EVENT = "390:SIM:EVT1"
ENTRY = """
[backend]
type = "entry"
url = "{url}"
timeout_seconds = 0.5
probe_interval_seconds = 0.05
{backend_extra}
[backend.entry]
api_key_file = "{key}"
venue_code = "TS"
data_account_id = "390"
make = "Raspberry Pi"
model = "Pi 4 Model B"
{extra}
"""

TICKETS = [SimTicket("3900000000001", EVENT, "Ada", "Lovelace", "1001", level="UPPER", section="05", row="6",
                     seat="7"),
           SimTicket("3900000000002", EVENT, "Bob", "Builder"),
           SimTicket("3900000000003", EVENT, "Cy", "Void", status="void"),
           SimTicket("3900000000004", "390:OLD:EVT0", "Di", "Yesterday")]


@pytest.fixture
def sim():
    s = EntrySimulator(tickets=TICKETS).start()
    yield s
    s.stop()


@pytest.fixture
def entry_config(load_config, tmp_path):
    def make(url: str, extra: str = "", backend_extra: str = "", key: str = "EXAMPLE-NOT-A-REAL-KEY-0000"):
        key_file = tmp_path / "entry-api.key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        cfg = load_config(ENTRY.format(url=url, key=key_file, extra=extra, backend_extra=backend_extra))
        cfg.lane["debounce_seconds"] = 0.0
        cfg.relay["pulse_seconds"] = 0.01  # closing waits for the relay: keep each test short
        for led in cfg.leds.values():
            led["on_seconds"] = 0.01
        return cfg
    return make


def run(cfg, scenario):
    """Build the gate as the daemon does, run scenario(parts), close everything."""
    async def main():
        parts = await build(cfg)
        try:
            return await scenario(parts)
        finally:
            await parts.close()
    return asyncio.run(main())


async def scan(parts, token: str, **kw):
    return await parts.gate.handle(Scan(token=token, reader="front", **kw))


async def rows(parts):
    return await parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans ORDER BY id")))


def bodies(sim, suffix):
    return [r.json() for r in sim.requests_to(suffix)]


# --- online ---------------------------------------------------------------------------------


def test_valid_ticket_is_admitted_online_keeping_entrys_code_and_message(sim, entry_config):
    async def scenario(parts):
        return await scan(parts, "3900000000001"), await rows(parts)

    decision, stored = run(entry_config(sim.url), scenario)
    assert (decision.verdict, decision.reason, decision.source) == (Verdict.ADMIT, Reason.OK, Source.ONLINE)
    assert (decision.backend_code, decision.message, decision.event_id) == ("OK", "Good Ticket", EVENT)
    assert stored[0]["upload"] == "none" and stored[0]["backend_code"] == "OK"
    body = bodies(sim, "/scan/validate")[0]
    assert {k: body[k] for k in ("token", "inputType", "barcodeType", "scanMode", "testMode", "softwareMode")} == {
        "token": "3900000000001", "inputType": "Barcode", "barcodeType": "Barcode", "scanMode": "Entry",
        "testMode": False, "softwareMode": "Pedestal"}
    assert datetime.fromisoformat(body["deviceTimestamp"]).utcoffset() is not None


def test_session_carries_device_context_read_from_the_system_and_nothing_invented(sim, entry_config):
    run(entry_config(sim.url), lambda parts: scan(parts, "3900000000001"))
    body = bodies(sim, "/session")[0]
    info = device.read()
    assert body["serialNumber"] == "TEST-0001" and body["venueCode"] == "TS" and body["dataAccountId"] == "390"
    assert (body["make"], body["model"], body["softwareMode"]) == ("Raspberry Pi", "Pi 4 Model B", "Pedestal")
    assert body["softwareVersion"] == f"gated {__version__}"
    for field, value in (("firmwareVersion", info.firmware_version), ("networkType", info.network_type),
                         ("localIPAddress", info.local_ip), ("macAddress", info.mac_address)):
        assert body.get(field) == value, field  # absent exactly when the system does not say
    assert not any(k.startswith(("specialArea", "wifi", "accessory", "mobile")) for k in body)


def test_every_request_carries_its_own_uuid4_pac_request_id(sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        await scan(parts, "3900000000001")
        await parts.backend.probe()
        sim.fail_status = 503
        await scan(parts, "3901234567890")
        sim.fail_status = None
        await Uploader(parts.backend, parts.store).drain()

    run(entry_config(sim.url), scenario)
    ids = [r.headers.get("pac-request-id") for r in sim.requests]
    assert len(sim.requests) >= 6 and all(ids)
    assert all(uuid.UUID(i).version == 4 for i in ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("first,token,mode,reason,code", [
    (None, "NOPE-1", "entry", Reason.UNKNOWN, "NOT_FOUND"),
    (None, "3900000000003", "entry", Reason.CANCELED, "VOIDED"),
    ("3900000000001", "3900000000001", "entry", Reason.ALREADY_USED, "ALREADY_SCANNED"),
    (None, "3900000000002", "exit", Reason.NOT_CHECKED_IN, "NOT_CHECKED_IN"),
    (None, "3900000000004", "entry", Reason.WRONG_EVENT, "WRONG_EVENT"),
])
def test_entrys_refusals_are_denied_with_gateds_reason_and_entrys_code(sim, entry_config, first, token, mode,
                                                                         reason, code):
    cfg = entry_config(sim.url)
    cfg.lane["scan_mode"] = mode

    async def scenario(parts):
        if first:
            await scan(parts, first)
        return await scan(parts, token)

    decision = run(cfg, scenario)
    assert (decision.verdict, decision.reason, decision.source, decision.backend_code) == (
        Verdict.DENY, reason, Source.ONLINE, code)
    assert decision.message  # Entry's reasonMessage, shown in the log line


def test_scan_before_the_events_scan_window_is_refused_online_as_not_yet_valid(sim, entry_config):
    start = datetime.now(ZoneInfo("America/Los_Angeles")) + timedelta(hours=1)
    sim.events[0]["scanStartDateTime"] = start.replace(tzinfo=None, microsecond=0).isoformat()
    decision = run(entry_config(sim.url), lambda parts: scan(parts, "3900000000001"))
    assert (decision.reason, decision.backend_code) == (Reason.NOT_YET_VALID, "TOO_EARLY")


@pytest.mark.parametrize("status,code,reason", [
    ("Admit", "OK", Reason.OK), ("Stop", "Already Scanned", Reason.ALREADY_USED),
    ("Stop", "TICKET_REFUNDED", Reason.CANCELED), ("Stop", "EVENT_ENDED", Reason.EXPIRED),
    ("Stop", "SOMETHING_NEW", Reason.REJECTED), ("Stop", "", Reason.REJECTED),
])
def test_reason_codes_map_to_one_vocabulary_and_unknown_ones_to_rejected(status, code, reason):
    assert map_reason(status, code) is reason


def test_qr_and_nfc_scans_tell_entry_their_symbology_and_wallet(sim, entry_config):
    async def scenario(parts):
        await scan(parts, "3900000000001", input=InputKind.QR)
        await scan(parts, "3900000000002", input=InputKind.NFC, nfc_type="apple")

    run(entry_config(sim.url), scenario)
    qr, nfc = bodies(sim, "/scan/validate")
    assert (qr["inputType"], qr["barcodeType"]) == ("Barcode", "QRCode")
    assert (nfc["inputType"], nfc["nfcType"]) == ("NFC", "Apple") and "barcodeType" not in nfc


def test_test_mode_is_sent_and_entry_does_not_count_those_scans(sim, entry_config):
    async def scenario(parts):
        return [await scan(parts, "3900000000001") for _ in range(2)]

    decisions = run(entry_config(sim.url, extra="test_mode = true"), scenario)
    assert [d.reason for d in decisions] == [Reason.OK, Reason.OK]
    assert all(b["testMode"] is True for b in bodies(sim, "/scan/validate"))


# --- the session ----------------------------------------------------------------------------


def test_session_revoked_mid_run_is_renewed_and_the_scan_in_flight_still_decided_online(sim, entry_config):
    async def scenario(parts):
        first = await scan(parts, "3900000000001")
        sim.revoke_sessions()
        second = await scan(parts, "3900000000002")
        await parts.backend.close_tasks()
        return first, second, await parts.store.call(Store.get, JWT_KEY)

    first, second, stored = run(entry_config(sim.url), scenario)
    assert first.source is Source.ONLINE and second.source is Source.ONLINE and second.reason is Reason.OK
    assert sim.sessions_created == 2
    assert [s for _, p, s in sim.statuses if p == "/scan/validate"] == [200, 401, 200]
    assert json.loads(stored)["jwt"] == sim.requests_to("/scan/validate")[-1].headers["authorization"][7:]


def test_jwt_near_its_exp_is_renewed_before_the_scan_without_a_refusal(sim, entry_config):
    async def scenario(parts):
        await scan(parts, "3900000000001")
        parts.backend.monotonic = lambda: time.monotonic() + 3590  # 10 s left of the simulator's hour
        return await scan(parts, "3900000000002")

    decision = run(entry_config(sim.url), scenario)
    assert decision.source is Source.ONLINE and decision.reason is Reason.OK
    assert sim.sessions_created == 2 and all(s != 401 for *_, s in sim.statuses)


def test_session_is_kept_in_the_store_and_reused_after_a_restart(sim, entry_config):
    cfg = entry_config(sim.url)
    run(cfg, lambda parts: scan(parts, "3900000000001"))
    run(cfg, lambda parts: scan(parts, "3900000000002"))
    assert sim.sessions_created == 1
    first, second = sim.requests_to("/scan/validate")
    assert first.headers["authorization"] == second.headers["authorization"]


def test_expired_stored_jwt_is_renewed_at_start_from_its_exp(sim, entry_config):
    cfg = entry_config(sim.url)
    sim.clock = lambda: time.time() - 7200  # this session expired an hour ago
    run(cfg, lambda parts: scan(parts, "3900000000001"))
    sim.clock = time.time
    decision = run(cfg, lambda parts: scan(parts, "3900000000002"))
    assert decision.source is Source.ONLINE and sim.sessions_created == 2
    assert all(s != 401 for *_, s in sim.statuses)


def test_wrong_api_key_is_one_error_naming_the_key_and_the_gate_decides_offline(sim, entry_config, caplog):
    caplog.set_level(logging.INFO, logger="gated")

    async def scenario(parts):
        return [await scan(parts, t) for t in ("3900000000001", "3900000000002")]

    decisions = run(entry_config(sim.url, key="WRONG"), scenario)
    assert all(d.source is Source.OFFLINE for d in decisions)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "API key refused" in errors[0] and "api_key_file" in errors[0]
    assert "PAC-Request-Id" in errors[0] and "WRONG" not in errors[0]


# --- offline --------------------------------------------------------------------------------


def test_get_events_stores_events_windows_masks_and_nfc_keys(sim, entry_config):
    sim.nfc_keys = {"apple": [{"ID": "a1", "private_key": "k", "passTypeId": "pass.com.example"}],
                    "google": [{"ID": "g1", "private_key": "k", "collectorId": "20180608", "version": "1"}]}

    async def scenario(parts):
        await parts.backend.sync(parts.store)
        get = lambda name: parts.store.call(Store.get_data, name)  # noqa: E731
        age = await parts.store.call(lambda s: parts.backend.data_age(s, time.time()))
        return await get("entry:events"), await get("entry:masks"), await get("entry:nfc_keys"), age

    events, masks, keys, age = run(entry_config(sim.url), scenario)
    assert keys[0] == sim.nfc_keys and masks[0] == {EVENT: ["390##########"]}
    stored = events[0]["events"][0]
    la = ZoneInfo("America/Los_Angeles")  # the venue's zone, from the session's venueTimezone claim
    expected = datetime.fromisoformat(sim.events[0]["scanStartDateTime"]).replace(tzinfo=la).timestamp()
    assert stored["eventId"] == EVENT and stored["scanStart"] == expected and events[0]["timezone"] == la.key
    assert 0 <= age < 5


def test_server_down_masks_decide_offline_within_the_deadline_and_scans_are_queued(sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        sim.fail_status = 503
        return await scan(parts, "3901234567890"), await scan(parts, "XYZ-1"), await rows(parts)

    admitted, denied, stored = run(entry_config(sim.url), scenario)
    assert (admitted.verdict, admitted.source, admitted.message) == (Verdict.ADMIT, Source.OFFLINE,
                                                                     "mask 390##########")
    assert admitted.event_id == EVENT and stored[0]["latency_ms"] < 500  # scan -> verdict, within the deadline
    assert (denied.verdict, denied.reason, denied.source) == (Verdict.DENY, Reason.UNKNOWN, Source.OFFLINE)
    assert [r["upload"] for r in stored] == ["pending", "pending"] and stored[1]["event_id"] == EVENT


def test_stalled_server_gets_an_offline_verdict_at_the_deadline_then_at_once_with_the_breaker_open(
        sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        sim.stall.set()
        decisions = [await scan(parts, t) for t in ("3901000000001", "3901000000002", "3901000000003")]
        sim.stall.clear()
        return decisions, await rows(parts)

    cfg = entry_config(sim.url)
    cfg.backend["timeout_seconds"] = 0.3
    decisions, stored = run(cfg, scenario)
    assert all(d.source is Source.OFFLINE and d.verdict is Verdict.ADMIT for d in decisions)
    times = [r["latency_ms"] for r in stored]  # scan -> verdict, as recorded
    assert all(300 <= t < 300 + 300 for t in times[:2])  # the deadline, not a connect timeout's worth more
    assert times[2] < 100  # the breaker opened after two failures: no wait at all


def test_ticket_admitted_online_is_denied_already_used_offline(sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        await scan(parts, "3900000000001")
        sim.fail_status = 503
        return await scan(parts, "3900000000001")

    decision = run(entry_config(sim.url), scenario)
    assert (decision.verdict, decision.reason, decision.source) == (Verdict.DENY, Reason.ALREADY_USED,
                                                                    Source.OFFLINE)


@pytest.mark.parametrize("shift_hours,trusted,reason", [
    (-7, True, Reason.EXPIRED),  # the window, two hours before now to six after, moved wholly into the past
    (3, True, Reason.NOT_YET_VALID),  # ... or wholly into the future
    (0, False, Reason.OK),  # clock before 2024: the window cannot be judged, the mask decides
])
def test_offline_scan_window_is_enforced_only_with_a_trusted_clock(sim, entry_config, shift_hours, trusted,
                                                                   reason):
    for field in ("scanStartDateTime", "scanEndDateTime"):
        moment = datetime.fromisoformat(sim.events[0][field]) + timedelta(hours=shift_hours)
        sim.events[0][field] = moment.isoformat()

    async def scenario(parts):
        await parts.backend.sync(parts.store)
        if not trusted:
            parts.decider.clock = lambda: 1_600_000_000.0  # 2020
        return await scan(parts, "3905550000001")

    decision = run(entry_config(sim.url, backend_extra="offline_first = true"), scenario)
    assert decision.reason is reason and decision.source is Source.OFFLINE and decision.event_id == EVENT


def test_installers_extra_masks_admit_offline_with_the_same_grammar(sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        return [await scan(parts, t) for t in ("VIP-0042", "VIP-042", "COMP-anything", "390ab12345678")]

    decisions = run(entry_config(sim.url, extra='masks = ["VIP-####", "COMP-*", "390??########"]',
                                 backend_extra="offline_first = true"), scenario)
    assert [d.verdict for d in decisions] == [Verdict.ADMIT, Verdict.DENY, Verdict.ADMIT, Verdict.ADMIT]


# --- upload ---------------------------------------------------------------------------------


async def offline_scans(parts, sim, tokens, **kw):
    await parts.backend.sync(parts.store)
    sim.fail_status = 503
    out = [await scan(parts, t, **kw) for t in tokens]
    sim.fail_status = None
    return out


def test_server_back_uploads_each_offline_scan_exactly_once_with_its_original_time(sim, entry_config):
    tokens = ["3901000000001", "3901000000002", "NOPE-7", "3901000000004", "3901000000005"]

    async def scenario(parts):
        decisions = await offline_scans(parts, sim, tokens)
        uploader = Uploader(parts.backend, parts.store)
        first, again = await uploader.drain(), await uploader.drain()
        return decisions, first, again, await rows(parts)

    decisions, first, again, stored = run(entry_config(sim.url), scenario)
    assert all(d.source is Source.OFFLINE for d in decisions)
    assert (first, again) == (5, 0) and [r["upload"] for r in stored] == ["sent"] * 5
    assert sim.upload_requests == 1 and set(sim.arrivals.values()) == {1}
    received = sim.received_scans()
    assert [s["token"] for s in received] == tokens
    assert [s["status"] for s in received] == ["Admit", "Admit", "Stop", "Admit", "Admit"]
    for s, row in zip(received, stored, strict=True):
        moment = datetime.fromisoformat(s["scanTimestamp"])
        assert moment.utcoffset() is not None and abs(moment.timestamp() - row["wall"]) < 1
        assert (s["inputType"], s["barcodeType"], s["eventId"], s["scanMode"]) == ("Barcode", "Barcode", EVENT,
                                                                                   "Entry")
    (req,) = sim.requests_to(f"/offline/{EVENT}")
    assert req.headers["content-encoding"] == "gzip" and req.headers["content-type"] == "application/json"
    assert req.headers["api-authorization-key"] == "EXAMPLE-NOT-A-REAL-KEY-0000"
    assert re.fullmatch(r"TEST-0001_\d{8}T\d{12}Z", req.headers["filename"])
    assert req.raw[:2] == b"\x1f\x8b" and json.loads(gzip.decompress(req.raw)) == req.json()
    (batch,) = req.json()
    assert {k: batch[k] for k in ("serialNumber", "dataAccountId", "venueCd", "deviceStatus", "eventId")} == {
        "serialNumber": "TEST-0001", "dataAccountId": "390", "venueCd": "TS", "deviceStatus": "Offline",
        "eventId": EVENT}
    assert batch["eventStartDate"] == sim.events[0]["startDateTime"]


def test_250_offline_scans_upload_in_three_requests_of_at_most_100(sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        for i in range(250):
            await scan(parts, f"39020000{i:05d}")
        return await Uploader(parts.backend, parts.store).drain()

    sent = run(entry_config(sim.url, backend_extra="offline_first = true"), scenario)
    counts = [sum(len(b["scans"]) for b in r.json()) for r in sim.requests_to(f"/offline/{EVENT}")]
    assert sent == 250 and counts == [100, 100, 50]
    assert len(sim.arrivals) == 250 and set(sim.arrivals.values()) == {1}
    assert len({r.headers["filename"] for r in sim.requests_to(f"/offline/{EVENT}")}) == 3


def test_an_upload_sends_nothing_while_a_scan_is_being_decided_and_goes_on_after_it(sim, entry_config):
    """The store thread and the event loop take one thing at a time: a visitor's scan goes first."""
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        for i in range(150):
            await scan(parts, f"39030000{i:05d}")
        parts.gate.quiet.enter()  # a scan read and not yet acted on
        drain = asyncio.create_task(Uploader(parts.backend, parts.store).drain())
        # Half of Quiet's 1 s limit: long enough for the whole upload had it not waited.
        done, _ = await asyncio.wait({drain}, timeout=0.5)
        requests_meanwhile = sim.upload_requests
        parts.gate.quiet.leave()
        return bool(done), requests_meanwhile, await drain

    waited, requests_meanwhile, sent = run(entry_config(sim.url, backend_extra="offline_first = true"), scenario)
    assert (waited, requests_meanwhile) == (False, 0)
    assert sent == 150 and sim.upload_requests == 2 and len(sim.arrivals) == 150


def test_entry_and_exit_scans_go_in_separate_batches_of_one_request(sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        await scan(parts, "3903000000001")
        parts.gate.scan_mode = ScanMode.EXIT
        await scan(parts, "3903000000001")
        await scan(parts, "NFC-PASS", input=InputKind.NFC, nfc_type="google")
        return await Uploader(parts.backend, parts.store).drain()

    assert run(entry_config(sim.url, backend_extra="offline_first = true"), scenario) == 3
    (req,) = sim.requests_to(f"/offline/{EVENT}")
    entry, exit_ = req.json()
    assert (entry["scanMode"], len(entry["scans"]), exit_["scanMode"], len(exit_["scans"])) == ("Entry", 1, "Exit", 2)
    assert {k: exit_["scans"][1][k] for k in ("inputType", "nfcType")} == {"inputType": "NFC", "nfcType": "Google"}


def test_upload_refused_for_good_is_parked_kept_and_delivered_after_retry(sim, entry_config):
    async def scenario(parts):
        await offline_scans(parts, sim, ["3901000000001", "3901000000002"])
        sim.api_key = "ROTATED"
        uploader = Uploader(parts.backend, parts.store)
        refused = await uploader.drain()
        parked = await parts.store.call(Store.parked)
        sim.api_key = "EXAMPLE-NOT-A-REAL-KEY-0000"
        await parts.store.call(Store.retry_parked)
        return refused, parked, await uploader.drain()

    refused, parked, delivered = run(entry_config(sim.url), scenario)
    assert refused == 0 and len(parked) == 2
    assert "HTTP 401" in parked[0]["upload_error"] and "PAC-Request-Id" in parked[0]["upload_error"]
    assert delivered == 2 and len(sim.arrivals) == 2 and set(sim.arrivals.values()) == {1}


def test_upload_during_server_errors_keeps_scans_queued_for_the_backoff(sim, entry_config):
    async def scenario(parts):
        await offline_scans(parts, sim, ["3901000000001"])
        sim.fail_status = 500
        uploader = Uploader(parts.backend, parts.store)
        sent = await uploader.drain()
        return sent, uploader.failures, await parts.store.call(Store.queue_stats)

    sent, failures, stats = run(entry_config(sim.url), scenario)
    assert (sent, failures, stats.pending, stats.parked) == (0, 1, 1, 0)


def test_a_duplicate_reported_by_entry_counts_as_uploaded(sim, entry_config):
    async def scenario(parts):
        await offline_scans(parts, sim, ["3901000000001"])
        sim.fail_status = 409
        sent = await Uploader(parts.backend, parts.store).drain()
        return sent, await parts.store.call(Store.queue_stats)

    sent, stats = run(entry_config(sim.url), scenario)
    assert sent == 1 and stats.pending == 0 and stats.parked == 0


def test_a_refusal_entry_never_received_is_uploaded_though_an_earlier_admission_is_in_its_history(
        sim, entry_config):
    # Ticket Lookup before the upload of a scan whose online answer was lost: the history holds this
    # lane's earlier, answered admission of the same ticket, which must not pass for the lost request.
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        first = await scan(parts, "3900000000001")
        sim.stall.set()  # accepted, never answered, never acted on
        again = await scan(parts, "3900000000001")
        sim.stall.clear()
        return first, again, await Uploader(parts.backend, parts.store).drain(), await rows(parts)

    first, again, sent, stored = run(entry_config(sim.url), scenario)
    assert first.source is Source.ONLINE and (again.source, again.reason) == (Source.OFFLINE, Reason.ALREADY_USED)
    assert stored[1]["online_unanswered"] == 1 and sent == 1
    assert len(sim.requests_to("/scan/lookup/3900000000001")) == 1
    assert [(s["token"], s["status"]) for s in sim.received_scans()] == [("3900000000001", "Stop")]


def test_a_request_that_never_left_the_gate_needs_no_lookup_before_its_upload(entry_config, sim):
    import socket

    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

    async def scenario(parts):
        return await scan(parts, "3901000000001"), await rows(parts)

    decision, stored = run(entry_config(f"http://127.0.0.1:{port}"), scenario)
    assert decision.source is Source.OFFLINE and not decision.online_unanswered
    assert stored[0]["online_unanswered"] == 0


def test_lite_session_decides_offline_and_still_uploads(sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        decision = await scan(parts, "3901000000001")
        return decision, await Uploader(parts.backend, parts.store).drain()

    decision, sent = run(entry_config(sim.url, extra="lite = true"), scenario)
    assert decision.source is Source.OFFLINE and decision.verdict is Verdict.ADMIT and sent == 1
    assert sim.requests_to("/session/lite") and not sim.requests_to("/session")
    assert not sim.requests_to("/scan/validate") and sim.sessions_created == 1


# --- tools and configuration ----------------------------------------------------------------


def test_gated_lookup_prints_the_ticket_and_its_scan_history(sim, entry_config, capsys):
    cfg = entry_config(sim.url)
    run(cfg, lambda parts: scan(parts, "3900000000001"))
    assert cli.main(["lookup", "--config", cfg.path, "3900000000001"]) == 0
    out = capsys.readouterr().out
    assert f"Simulated event ({EVENT})" in out and "Ada Lovelace" in out and "section 05" in out
    assert "scan history at Entry: 1" in out and 'Entry Admit OK "Good Ticket"' in out
    assert cli.main(["lookup", "--config", cfg.path, "NOPE/1"]) == 0
    assert "not known to Entry (Ticket not found)" in capsys.readouterr().out


def test_gated_pair_checks_the_venue_and_stores_the_session(sim, entry_config, capsys):
    cfg = entry_config(sim.url)
    assert cli.main(["pair", "--config", cfg.path, "XX"]) == 2
    assert "venue XX is not a venue of data account 390 (its venues: TS)" in capsys.readouterr().err
    assert cli.main(["pair", "--config", cfg.path, "TS"]) == 0
    assert "paired with Entry venue TS (Titan Stadium, America/Los_Angeles)" in capsys.readouterr().out
    run(cfg, lambda parts: scan(parts, "3900000000001"))
    assert sim.sessions_created == 1  # the daemon used the paired session


def test_url_with_a_path_and_overridden_paths_reach_the_same_api(entry_config):
    prefixed = EntrySimulator(tickets=TICKETS, base_path="/entry/v1").start()
    try:
        d1 = run(entry_config(prefixed.url + "/entry/v1"), lambda parts: scan(parts, "3900000000001"))
        paths = "\n".join(f'path_{n} = "/entry/v1{p}"' for n, p in (
            ("session", "/session"), ("events", "/events"), ("validate", "/scan/validate")))
        d2 = run(entry_config(prefixed.url, extra=paths), lambda parts: scan(parts, "3900000000002"))
    finally:
        prefixed.stop()
    assert d1.source is Source.ONLINE and d2.source is Source.ONLINE and d2.reason is Reason.OK


def test_missing_keys_and_bad_path_overrides_are_reported(load_config, entry_config, tmp_path, sim):
    with pytest.raises(ConfigError) as e:
        load_config('[backend]\ntype = "entry"\nurl = "https://entry.example.com"\n[backend.entry]\n')
    assert "[backend.entry] venue_code: missing; venue code from the venue profile, e.g. \"TS\"." in e.value.problems
    assert any(p.startswith("[backend.entry] api_key_file: missing") for p in e.value.problems)
    cfg = entry_config(sim.url, extra='path_lookup = "/scan/lookup"')
    with pytest.raises(ConfigError) as e:
        run(cfg, lambda parts: scan(parts, "x"))
    assert e.value.problems == ['[backend.entry] path_lookup = "/scan/lookup": must contain {barcode}']


def test_a_400_not_in_entrys_error_shape_is_a_failed_call_decided_offline_and_counted_by_the_breaker(
        sim, entry_config):
    async def scenario(parts):
        await parts.backend.sync(parts.store)
        sim.fail_status = 400  # answers {"message": ...}: a proxy's 400, not Entry's {"error": {...}}
        decisions = [await scan(parts, t) for t in ("3901234567890", "3901234567891")]
        return decisions, parts.decider.breaker.is_open

    decisions, breaker_open = run(entry_config(sim.url), scenario)
    assert [(d.verdict, d.source) for d in decisions] == [(Verdict.ADMIT, Source.OFFLINE)] * 2
    assert breaker_open


def test_a_scan_window_beyond_any_time_leaves_that_side_open_and_the_sync_still_succeeds(sim, entry_config):
    sim.events[0]["scanStartDateTime"] = 10**400  # float() overflows: OverflowError, not ValueError

    async def scenario(parts):
        await parts.backend.sync(parts.store)
        sim.fail_status = 503
        return await scan(parts, "3901234567890"), await parts.store.call(Store.get_data, "entry:events")

    admitted, events = run(entry_config(sim.url), scenario)
    assert events is not None and events[0]["events"][0]["scanStart"] is None
    assert (admitted.verdict, admitted.source) == (Verdict.ADMIT, Source.OFFLINE)


def test_masks_from_entry_are_bounded_where_they_enter():
    """Masks are compiled on the scan path: a server's huge or countless masks would hold a scan for seconds."""
    from gated.policy.entry_data import MASK_LIMIT, MASKS_PER_EVENT, parse_events

    found = ["390##########", "*-" * 5000, 7, "", *(f"4{i:04d}#####" for i in range(MASKS_PER_EVENT + 10))]
    _, masks, problems = parse_events([{"eventId": "E1", "barcodeMasks": found}], UTC)
    assert masks["E1"][0] == "390##########" and len(masks["E1"]) == MASKS_PER_EVENT
    assert all(len(m) <= MASK_LIMIT for m in masks["E1"])
    assert any("3 barcode mask(s) skipped" in p for p in problems) and any("only the first" in p for p in problems)
