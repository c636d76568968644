"""CM.com backend against the spec-faithful simulator: real HTTP on 127.0.0.1, real SQLite, real pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from gated import cli, reload
from gated.daemon import build
from gated.errors import ConfigError, StoreError, Unreachable
from gated.model import Reason, Scan, ScanMode, Source, Verdict
from gated.policy.cm import MESSAGES, SYNC_KEY, scan_user
from gated.simulators.cm import CMSimulator, Hold, generated_barcode
from gated.store import Store, StoreThread, lists_dir
from gated.upload import Uploader

ROOT = Path(__file__).parent.parent.parent
NOW = int(time.time())
EARLIER = NOW - 600  # a check-in ten minutes ago


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


@pytest.fixture
def sim():
    s = CMSimulator(username="scanner", password="letmein")
    s.service = s.add_service("Main Entrance")
    s.other = s.add_service("VIP Lounge")
    s.add_barcode(s.service, "OK-1")
    s.add_barcode(s.service, "USED-1", count_checked_in=1, remaining_scans=0, last_checked_in_time=EARLIER)
    s.add_barcode(s.service, "TYPE-1", is_checkin_allowed=0)
    s.add_barcode(s.service, "CANCELED-1", is_canceled=1)
    s.add_barcode(s.service, "EXPIRED-1", expire_from=NOW - 3600)
    s.add_barcode(s.service, "ENDED-1", checkin_valid_till=NOW - 60)
    s.add_barcode(s.service, "LATER-1", checkin_valid_from=NOW + 3600)
    s.add_barcode(s.service, "INSIDE-1", count_checked_in=1, remaining_scans=0, last_checked_in_time=EARLIER)
    s.add_barcode(s.service, "OUT-1", count_checked_in=1, remaining_scans=0, last_checked_in_time=EARLIER,
                  last_checked_out_time=EARLIER + 60)
    s.add_barcode(s.service, "NEVER-1")
    s.add_barcode(s.other, "VIP-1")
    with s:
        yield s


@pytest.fixture
def password(tmp_path):
    def write(text: str = "letmein") -> Path:
        path = tmp_path / "cm-password"
        path.write_text(text + "\n")
        path.chmod(0o600)
        return path
    return write


@pytest.fixture
def cm(load_config, sim, password):
    def make(strategy: str = "direct", scan_mode: str = "entry", cm_extra: str = "", pw: str = "letmein",
             service: str = 'service_name = "Main Entrance"'):
        config = load_config(textwrap.dedent(f"""
            [backend]
            type = "cm"
            url = "{sim.api_url}"
            [backend.cm]
            username = "scanner"
            password_file = "{password(pw)}"
            strategy = "{strategy}"
            {service}
        """) + textwrap.dedent(cm_extra))
        config.lane["scan_mode"] = scan_mode
        config.lane["debounce_seconds"] = 0.0
        config.relay["pulse_seconds"] = 0.01  # nothing here watches the relay: do not wait for it
        for led in config.leds.values():
            led["on_seconds"] = 0.01
        return config
    return make


@contextlib.asynccontextmanager
async def gate(config, *, sync: bool = True):
    """A gate built as the daemon builds it, with the syncer's own store connection."""
    parts = await build(config)
    sync_store = StoreThread(config.store.path, "sync")
    try:
        if sync:
            await parts.backend.sync(sync_store)
        yield parts, sync_store
    finally:
        await parts.close()
        sync_store.close()


async def scan(parts, token: str):
    return await parts.gate.handle(Scan(token=token, reader="front"))


async def answer_lost(sim, parts, token: str):
    """Scan `token` while CM.com acts on each request but its answer never arrives: decided offline."""
    sim.lose_answers.set()
    try:
        return await scan(parts, token)
    finally:
        sim.lose_answers.clear()


def _rows(parts):
    return parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans ORDER BY id")))


# --- session ------------------------------------------------------------------------------

def test_login_sends_device_info_built_from_lane_serial_and_reads_scan_user_from_the_token(sim, cm):
    async def run():
        async with gate(cm(), sync=False) as (parts, _):
            return parts.backend

    backend = asyncio.run(run())
    login, services = sim.requests[0], sim.requests[1]
    assert login.path == "/scanapi/v2.0/userlogin" and login.json() == {
        "credentials": {"username": "scanner", "password": "letmein"}}
    device = login.headers["x-device-info"]
    assert device.startswith("DEVICE_ID:TEST-0001,MANUFACTURER:") and ",MODEL:" in device and ",OS:" in device
    assert backend.user_uuid == sim.user_uuid and backend.service_uuid == sim.service
    assert services.path == f"/scanapi/v2.0/users/{sim.user_uuid}/services"
    assert services.headers["authorization"].startswith("bearer ")


def test_scan_user_is_read_from_user_uuid_when_the_token_has_no_sub():
    assert scan_user({"user": {"uuid": "u-1", "active": True}}) == "u-1"
    assert scan_user({"sub": "u-2", "user": {"uuid": "u-1"}}) == "u-2"
    assert scan_user({"iss": "x"}) is None


def test_wrong_password_is_refused_at_start_naming_the_keys_to_check(cm):
    with pytest.raises(ConfigError) as e:
        asyncio.run(build(cm(pw="wrong")))
    text = e.value.problems[0]
    assert text.startswith("[backend.cm] username, password_file: CM.com refused the login of scan user")
    assert "invalid username or password" in text and "wrong" not in text


def test_a_changed_password_is_checked_at_start_not_hidden_by_the_stored_session(cm):
    async def start(pw):
        async with gate(cm(pw=pw), sync=False):
            pass

    asyncio.run(start("letmein"))
    with pytest.raises(ConfigError):
        asyncio.run(start("changed"))


@pytest.mark.parametrize("service", ['service_name = "Side Door"', 'service_uuid = "0000-none"', ""])
def test_a_missing_service_refuses_start_and_lists_the_available_ones(cm, service):
    with pytest.raises(ConfigError) as e:
        asyncio.run(build(cm(service=service)))
    text = e.value.problems[0]
    assert text.startswith("[backend.cm] service_") and '"Main Entrance" (uuid ' in text and '"VIP Lounge"' in text


def test_a_service_chosen_by_uuid_is_used(sim, cm):
    async def run():
        async with gate(cm(service=f'service_uuid = "{sim.other}"', strategy="local")) as (parts, _):
            return await scan(parts, "VIP-1"), await scan(parts, "OK-1")

    vip, main = asyncio.run(run())
    assert vip.backend_code == "100" and main.backend_code == "40"


def test_an_expired_token_is_renewed_once_and_the_scan_still_goes_online(sim, cm):
    async def run():
        async with gate(cm(), sync=False) as (parts, _):
            sim.expire_tokens()
            return await scan(parts, "OK-1")

    d = asyncio.run(run())
    assert d.source is Source.ONLINE and d.backend_code == "100"
    assert sim.logins == 2
    statuses = [r.path.rsplit("/", 1)[1] for r in sim.requests]
    assert statuses[-3:] == ["checkin", "userlogin", "checkin"]


def test_a_short_lived_token_is_used_until_near_its_end_not_renewed_every_call(sim, cm):
    sim.token_ttl = 20.0  # shorter than the usual 60 s renewal margin

    async def run():
        async with gate(cm()) as (parts, _):
            return [await scan(parts, t) for t in ("OK-1", "NEVER-1", "TYPE-1")]

    assert [d.source for d in asyncio.run(run())] == [Source.ONLINE] * 3
    assert sim.logins == 1


def test_a_stored_token_is_reused_after_a_restart(sim, cm):
    config = cm()

    async def run():
        for _ in range(2):
            async with gate(config, sync=False) as (parts, _):
                await scan(parts, "OK-1")

    asyncio.run(run())
    assert sim.logins == 1


# --- every status code, scan direct and scan locally ----------------------------------------

CASES = [  # token, scan mode, code, reason online (the server says only the code), reason local
    ("OK-1", "entry", 100, Reason.OK, Reason.OK),
    ("NOPE-1", "entry", 40, Reason.UNKNOWN, Reason.UNKNOWN),
    ("TYPE-1", "entry", 45, Reason.PRODUCT_NOT_ALLOWED, Reason.PRODUCT_NOT_ALLOWED),
    ("CANCELED-1", "entry", 45, Reason.PRODUCT_NOT_ALLOWED, Reason.CANCELED),
    ("LATER-1", "entry", 45, Reason.PRODUCT_NOT_ALLOWED, Reason.NOT_YET_VALID),
    ("USED-1", "entry", 50, Reason.ALREADY_USED, Reason.ALREADY_USED),
    ("EXPIRED-1", "entry", 60, Reason.EXPIRED, Reason.EXPIRED),
    ("ENDED-1", "entry", 60, Reason.EXPIRED, Reason.EXPIRED),
    ("INSIDE-1", "exit", 200, Reason.OK, Reason.OK),
    ("OUT-1", "exit", 210, Reason.ALREADY_USED, Reason.ALREADY_USED),
    ("NEVER-1", "exit", 220, Reason.NOT_CHECKED_IN, Reason.NOT_CHECKED_IN),
    ("NOPE-1", "exit", 230, Reason.UNKNOWN, Reason.UNKNOWN),
]


@pytest.mark.parametrize("strategy", ["direct", "local"])
def test_every_status_code_with_its_reason_and_message(cm, sim, strategy):
    async def run():
        async with gate(cm(strategy=strategy)) as (parts, _):
            out = []
            for token, mode, *_ in CASES:
                parts.gate.scan_mode = ScanMode(mode)
                out.append(await scan(parts, token))
            return out, await _rows(parts)

    decisions, rows = asyncio.run(run())
    got = [(t, m, d.backend_code, d.verdict, d.reason, d.source, d.message)
           for (t, m, *_), d in zip(CASES, decisions, strict=True)]
    source = Source.ONLINE if strategy == "direct" else Source.OFFLINE
    expected = [(t, m, str(code), Verdict.ADMIT if code in (100, 200) else Verdict.DENY,
                 online if strategy == "direct" else local, source,
                 MESSAGES[code].format(last_checked_in_time=_stamp(EARLIER),
                                       expire_time=_stamp(NOW - 3600 if t == "EXPIRED-1" else NOW - 60)))
                for t, m, code, online, local in CASES]
    assert got == expected
    # Scan direct asks the server each time; scan locally asks nothing and queues every scan for upload.
    checkins = [r for r in sim.requests if r.path.endswith(("/checkin", "/checkout"))]
    assert len(checkins) == (len(CASES) if strategy == "direct" else 0)
    assert {r["upload"] for r in rows} == ({"none"} if strategy == "direct" else {"pending"})


def test_a_ticket_admitted_locally_is_denied_already_scanned_the_second_time(cm):
    async def run():
        async with gate(cm(strategy="local")) as (parts, _):
            return [await scan(parts, "OK-1") for _ in range(2)]

    first, second = asyncio.run(run())
    assert first.backend_code == "100" and second.backend_code == "50" and second.reason is Reason.ALREADY_USED


# --- download -------------------------------------------------------------------------------

def test_full_download_walks_every_page_with_limit_and_page_headers(sim, cm):
    sim.generate(sim.service, 1234)

    async def run():
        async with gate(cm(strategy="local")) as (parts, _):
            return await parts.store.call(Store.ticket_count, "cm"), await scan(parts, "CM00001233")

    count, d = asyncio.run(run())
    pages = [r for r in sim.requests if r.path.endswith("/barcodes")]
    assert [(r.headers["x-pagination-limit"], r.headers["x-pagination-page"]) for r in pages] == [
        ("500", "1"), ("500", "2"), ("500", "3")]
    assert not any("x-compare-timestamp" in r.headers for r in pages)
    assert count == 1234 + 10 and d.admitted


def test_a_list_arriving_in_no_order_of_its_codes_is_loaded_whole(sim, cm):
    # Real shops' codes are random and their pages follow creation: the benchmark's case too.
    sim.generate(sim.service, 1500, scrambled=True)
    codes = [generated_barcode("CM", i, True) for i in (1, 6, 1499)]

    async def run():
        async with gate(cm(strategy="local")) as (parts, _):
            return (await parts.store.call(Store.ticket_count, "cm"), [await scan(parts, c) for c in codes],
                    await scan(parts, generated_barcode("CM", 1500, True)))

    count, decisions, beyond = asyncio.run(run())
    assert codes != sorted(codes) and count == 1500 + 10
    assert all(d.admitted for d in decisions) and beyond.backend_code == "40"


def test_delta_sync_asks_for_changes_since_the_previous_start_and_picks_up_a_cancelled_barcode(sim, cm):
    async def run():
        async with gate(cm(strategy="local")) as (parts, sync_store):
            before = await scan(parts, "NEVER-1")
            compare = json.loads(await sync_store.call(Store.get, SYNC_KEY))["compare"]
            sim.update_barcode(sim.service, "OK-1", is_canceled=1)
            await parts.backend.sync(sync_store)
            return before, compare, await scan(parts, "OK-1")

    before, compare, after = asyncio.run(run())
    delta = [r for r in sim.requests if r.path.endswith("/barcodes")][-1]
    assert before.admitted
    assert delta.headers["x-compare-timestamp"] == str(compare) and compare <= time.time()
    assert after.backend_code == "45" and after.reason is Reason.CANCELED


def test_a_damaged_barcode_list_is_downloaded_whole_at_the_next_sync_not_as_changes(sim, cm):
    config = cm(strategy="local")

    async def run():
        async with gate(config):
            pass
        (listed,) = lists_dir(config.store.path).glob("*.sqlite")
        listed.write_bytes(b"a sector the SD card mangled" * 200)
        async with gate(config, sync=False) as (parts, sync_store):  # restarted on the damaged file
            failed = await scan(parts, "OK-1")
            await parts.backend.sync(sync_store)
            return failed, await scan(parts, "NEVER-1")

    failed, after = asyncio.run(run())
    pages = [r for r in sim.requests if r.path.endswith("/barcodes")]
    assert (failed.verdict, failed.reason) == (Verdict.DENY, Reason.ERROR)
    assert "x-compare-timestamp" not in pages[-1].headers  # the whole list, not the changes
    assert after.admitted


async def held_reload(sim, parts, sync_store) -> tuple[asyncio.Task, Hold]:
    """A full reload started after NEW-1 was added, held at its second page (pages of 5)."""
    sim.add_barcode(sim.service, "NEW-1")
    sim.hold = hold = Hold(page=2)
    task = asyncio.get_running_loop().create_task(parts.backend.sync(sync_store, full=True))
    assert await asyncio.to_thread(hold.reached.wait, 10)
    return task, hold


def test_scans_during_a_full_reload_are_decided_on_the_previous_list(sim, cm):
    config = cm(strategy="local", cm_extra="page_size = 5\n")

    async def run():
        async with gate(config) as (parts, sync_store):
            reloading, hold = await held_reload(sim, parts, sync_store)
            during = await scan(parts, "OK-1"), await scan(parts, "NEW-1")
            hold.release.set()
            await asyncio.wait_for(reloading, 10)
            return during, await scan(parts, "NEW-1")

    (old, new_during), new_after = asyncio.run(run())
    assert old.admitted and new_during.backend_code == "40" and new_after.admitted


def test_a_full_reload_that_fails_half_way_keeps_the_previous_list_and_says_why(sim, cm):
    config = cm(strategy="local", cm_extra="page_size = 5\n")

    async def run():
        async with gate(config) as (parts, sync_store):
            reloading, hold = await held_reload(sim, parts, sync_store)
            sim.fail_status = 503  # page 3 and on: the server falls over mid-download
            hold.release.set()
            with pytest.raises(Unreachable, match="HTTP 503"):
                await asyncio.wait_for(reloading, 20)
            sim.fail_status = None
            files = list(lists_dir(config.store.path).glob("*.sqlite"))
            loading = await sync_store.call(lambda s: s.get("loading:cm"))
            return files, loading, await scan(parts, "OK-1"), await scan(parts, "NEW-1")

    files, loading, old, new = asyncio.run(run())
    assert len(files) == 1 and loading is None  # the half list is gone, nothing half-named is left
    assert old.admitted and new.backend_code == "40"  # decided on the previous list


async def held_reload_process(sim, config, parts) -> tuple[subprocess.Popen, Hold]:
    """`python -m gated.reload` started as the daemon starts it, held by the simulator at page 2."""
    job = {"config": config, "state": parts.backend.reload_state(), "store": config.store.path}
    sim.hold = hold = Hold(page=2)
    child = subprocess.Popen([sys.executable, "-m", "gated.reload"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reload.yield_cpu(child.pid)  # as run_in_child does (test_the_daemon_lowers_...), before the job
    child.stdin.write(reload.encode_job(job))
    child.stdin.flush()
    assert await asyncio.to_thread(hold.reached.wait, 10)
    return child, hold


def test_the_reload_process_only_takes_cpu_time_the_lane_leaves(sim, cm):
    """SCHED_IDLE (and nice 10): a scan's threads take the CPU from it the moment they wake."""
    config = cm(strategy="local", cm_extra="page_size = 5\n")

    async def run():
        async with gate(config) as (parts, _):
            child, hold = await held_reload_process(sim, config, parts)  # downloading and writing
            try:
                threads = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
                return {os.sched_getscheduler(t) for t in threads}, os.getpriority(os.PRIO_PROCESS, child.pid)
            finally:
                child.stdin.close()
                hold.release.set()
                await asyncio.to_thread(child.wait, 10)

    policies, niceness = asyncio.run(run())
    assert policies == {os.SCHED_IDLE} and niceness == reload.NICENESS


def test_the_daemon_lowers_the_reload_process_before_its_imports_run(monkeypatch):
    """Its interpreter's start and imports are most of its CPU time outside the pages: lowered by
    the daemon as soon as it exists, not only by itself once it has read its job."""
    started, seen = [], []
    spawn = asyncio.create_subprocess_exec

    async def spawned(*args, **kw):
        started.append(await spawn(*args, **kw))
        return started[-1]

    def job_written(job):  # the moment the daemon hands the child its job: the child waits for it
        pid = started[-1].pid
        seen.append((os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)))
        return reload._HEADER.pack(0)  # an empty job: the child stops at once

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawned)
    monkeypatch.setattr(reload, "encode_job", job_written)
    with pytest.raises(StoreError):
        asyncio.run(reload.run_in_child({}))
    assert seen == [(os.SCHED_IDLE, max(reload.NICENESS, os.getpriority(os.PRIO_PROCESS, 0)))]


def test_the_reload_process_ends_with_the_daemon_and_its_half_list_is_removed_later(sim, cm):
    """A daemon killed mid-reload (SIGKILL, power) must not leave a process writing on, nor a file."""
    config = cm(strategy="local", cm_extra="page_size = 5\n")

    async def run():
        async with gate(config) as (parts, sync_store):
            child, hold = await held_reload_process(sim, config, parts)  # page 1 is in its file
            half = await sync_store.call(lambda s: s.get("loading:cm"))
            child.stdin.close()  # what the kernel does to the pipe when the daemon dies
            code = await asyncio.to_thread(child.wait, 10)
            hold.release.set()
            admitted_meanwhile = await scan(parts, "OK-1")  # the previous list still decides
            sim.hold = None
            await parts.backend.sync(sync_store, full=True)
            files = sorted(p.name for p in lists_dir(config.store.path).glob("*.sqlite"))
            return code, half, admitted_meanwhile, files, await scan(parts, "NEVER-1")

    code, half, admitted_meanwhile, files, after = asyncio.run(run())
    assert code != 0 and half is not None and admitted_meanwhile.admitted
    assert half not in files and len(files) == 1 and after.admitted


# --- offline fallback and upload -----------------------------------------------------------

def test_offline_scans_are_uploaded_once_with_the_time_they_were_made(sim, cm, tmp_path):
    config = cm(strategy="direct")

    async def offline_then_back():
        async with gate(config) as (parts, _):
            sim.fail_status = 503
            admitted = await scan(parts, "OK-1")
            denied = await scan(parts, "TYPE-1")
            sim.fail_status = None
            uploader = Uploader(parts.backend, parts.store)
            sent = [await uploader.drain(), await uploader.drain()]
            return admitted, denied, sent, await _rows(parts)

    async def restart():
        async with gate(config, sync=False) as (parts, _):
            return await Uploader(parts.backend, parts.store).drain()

    admitted, denied, sent, rows = asyncio.run(offline_then_back())
    assert admitted.source is Source.OFFLINE and admitted.backend_code == "100"
    assert denied.source is Source.OFFLINE and denied.backend_code == "45"
    assert sent == [2, 0] and asyncio.run(restart()) == 0
    assert [(u["barcode_id"], u["checked_in_time"], u["status_code"], u["status_message"]) for u in sim.uploads] == [
        ("OK-1", int(rows[0]["wall"]), 100, MESSAGES[100]), ("TYPE-1", int(rows[1]["wall"]), 45, MESSAGES[45])]
    assert sim.barcode(sim.service, "OK-1")["count_checked_in"] == 1


def test_a_second_entry_cm_never_received_is_uploaded_though_the_first_is_its_last_check_in(sim, cm):
    # Before uploading a scan whose online answer was lost, gated reads the barcode's changes: its
    # last check-in here is this lane's earlier, answered one, which must not pass for the lost request.
    sim.add_barcode(sim.service, "TWICE-1", validation_max_checkins=2, remaining_scans=2)
    config = cm(strategy="direct")
    config.backend["timeout_seconds"] = 0.3

    async def run():
        async with gate(config) as (parts, _):
            first = await scan(parts, "TWICE-1")
            sim.stall.set()  # accepted, never answered, never acted on
            second = await scan(parts, "TWICE-1")
            sim.stall.clear()
            return first, second, await Uploader(parts.backend, parts.store).drain(), await _rows(parts)

    first, second, sent, rows = asyncio.run(run())
    assert first.source is Source.ONLINE and (second.source, second.verdict) == (Source.OFFLINE, Verdict.ADMIT)
    assert rows[1]["online_unanswered"] == 1 and sent == 1
    assert [u["barcode_id"] for u in sim.uploads] == ["TWICE-1"]
    assert sim.barcode(sim.service, "TWICE-1")["count_checked_in"] == 2


def test_a_check_in_cm_counted_from_a_lost_answer_is_not_uploaded_but_its_check_out_is(sim, cm):
    # Nobody passed through: CM.com's count must be annulled, though the check-in is not sent again.
    config = cm(strategy="direct")
    config.backend["timeout_seconds"] = 0.3

    async def run():
        async with gate(config) as (parts, _):
            decision = await answer_lost(sim, parts, "OK-1")
            (row,) = await _rows(parts)
            await parts.store.call(Store.mark_passed, row["nonce"], False)  # the turnstile timed out
            return decision, await Uploader(parts.backend, parts.store).drain()

    decision, sent = asyncio.run(run())
    assert decision.online_unanswered and decision.admitted and sent == 1
    assert [u["status_code"] for u in sim.uploads] == [200]  # the check-out alone
    barcode = sim.barcode(sim.service, "OK-1")
    assert barcode["count_checked_in"] == 1 and barcode["last_checked_out_time"] is not None


def test_too_many_changes_to_read_before_an_upload_mean_the_scan_is_uploaded(sim, cm):
    # The check is bounded (20 pages of changes): past that, doubt, and doubt uploads.
    config = cm(strategy="direct", cm_extra="page_size = 5\n")
    config.backend["timeout_seconds"] = 0.3

    async def run():
        async with gate(config) as (parts, _):
            decision = await answer_lost(sim, parts, "OK-1")
            for i in range(120):  # a busy venue: 24 pages of changes since
                sim.add_barcode(sim.service, f"BUSY-{i}")
            return decision, await Uploader(parts.backend, parts.store).drain()

    decision, sent = asyncio.run(run())
    assert decision.online_unanswered and sent == 1 and [u["barcode_id"] for u in sim.uploads] == ["OK-1"]
    pages = [r for r in sim.requests if r.path.endswith("/barcodes") and "x-compare-timestamp" in r.headers]
    assert len(pages) == 20


def test_an_upload_sent_again_after_a_lost_answer_is_counted_once(sim, cm):
    async def run():
        async with gate(cm(strategy="local")) as (parts, _):
            await scan(parts, "OK-1")
            rows = await parts.store.call(Store.pending)
            first = await parts.backend.upload(rows)  # the answer "got lost": not marked sent
            again = await parts.backend.upload(rows)
            return first, again

    first, again = asyncio.run(run())
    assert first.sent == again.sent and len(first.sent) == 1
    assert len(sim.uploads) == 1 and sim.barcode(sim.service, "OK-1")["count_checked_in"] == 1


def test_a_refused_upload_parks_only_that_scan(sim, cm):
    sim.refuse_upload_of = {"TYPE-1"}

    async def run():
        async with gate(cm(strategy="local")) as (parts, _):
            for token in ("OK-1", "TYPE-1", "NEVER-1"):
                await scan(parts, token)
            await Uploader(parts.backend, parts.store).drain()
            return await _rows(parts)

    rows = asyncio.run(run())
    assert [r["upload"] for r in rows] == ["sent", "parked", "sent"]
    assert "barcode refused" in rows[1]["upload_error"]
    assert sorted(u["barcode_id"] for u in sim.uploads) == ["NEVER-1", "OK-1"]


def test_a_delta_does_not_erase_local_checkins_the_server_has_not_counted(sim, cm):
    # Two check-ins allowed, one made elsewhere: the one made here offline is the last.
    sim.add_barcode(sim.service, "TWICE-1", validation_max_checkins=2, remaining_scans=1, count_checked_in=1,
                    last_checked_in_time=EARLIER)

    async def run():
        async with gate(cm(strategy="local")) as (parts, sync_store):
            first = await scan(parts, "TWICE-1")
            sim.update_barcode(sim.service, "TWICE-1", ticket_type="Day Pass")  # the delta brings the row again
            await parts.backend.sync(sync_store)
            return first, await scan(parts, "TWICE-1")

    first, second = asyncio.run(run())
    assert first.admitted and second.backend_code == "50"


def test_an_uploaded_local_checkin_is_not_counted_twice_after_the_next_delta(sim, cm):
    sim.add_barcode(sim.service, "THRICE-1", validation_max_checkins=3, remaining_scans=2, count_checked_in=1,
                    last_checked_in_time=EARLIER)

    async def run():
        async with gate(cm(strategy="local")) as (parts, sync_store):
            first = await scan(parts, "THRICE-1")
            await Uploader(parts.backend, parts.store).drain()
            await parts.backend.sync(sync_store)
            return first, await scan(parts, "THRICE-1"), await scan(parts, "THRICE-1")

    first, second, third = asyncio.run(run())
    assert sim.barcode(sim.service, "THRICE-1")["count_checked_in"] == 2
    assert first.admitted and second.admitted and third.backend_code == "50"


def test_an_online_checkin_nobody_passed_through_is_checked_out(sim, cm):
    async def run():
        async with gate(cm()) as (parts, _):
            d = await scan(parts, "OK-1")
            await parts.store.call(Store.mark_passed, (await _rows(parts))[0]["nonce"], False)
            await parts.backend.not_passed((await _rows(parts))[0])
            return d

    assert asyncio.run(run()).admitted
    assert sim.requests[-1].path.endswith("/barcodes/checkout")
    assert sim.barcode(sim.service, "OK-1")["last_checked_out_time"] is not None


# --- the example and the simulator's own strictness -----------------------------------------

def test_the_cm_example_config_passes_gated_check(shipped_config, capsys):
    assert cli.main(["check", "--config", str(shipped_config("cm.toml"))]) == 0


def test_simulator_refuses_what_the_real_api_refuses(sim):
    device = {"X-DEVICE-INFO": "DEVICE_ID:X,MANUFACTURER:X,MODEL:X,OS:X,OS_VERSION:X",
              "Content-Type": "application/json"}
    with httpx.Client(base_url=sim.api_url + "/") as c:
        assert c.post("userlogin", json={"credentials": {"username": "scanner", "password": "letmein"}}
                      ).json() == {"info": {"message": "Unauthorized: missing or malformed X-DEVICE-INFO header"}}
        bad = c.post("userlogin", headers=device, json={"credentials": {"username": "scanner", "password": "x"}})
        assert bad.status_code == 401 and "info" in bad.json()
        token = c.post("userlogin", headers=device,
                       json={"credentials": {"username": "scanner", "password": "letmein"}}).json()["login"]["token"]
        auth = {**device, "Authorization": f"bearer {token}"}
        pages = {"X-PAGINATION-LIMIT": "501", "X-PAGINATION-PAGE": "1"}
        assert c.get(f"services/{sim.service}/barcodes", headers={**auth, **pages}).status_code == 400
        assert c.get(f"services/{sim.service}/barcodes", headers=device).status_code == 401
        no_user = c.post("barcodes/checkin", headers=auth, json={"service_uuid": sim.service, "barcode_id": "OK-1"})
        assert no_user.status_code == 400 and no_user.json()["info"]["message"].startswith("Bad request")
        text_time = c.post("barcodes/upload", headers=auth, json={
            "user_uuid": sim.user_uuid, "service_uuid": sim.service, "barcodes": [
                {"barcode_id": "OK-1", "checked_in_time": "2024-01-01", "status_code": 100, "status_message": ""}]})
        assert text_time.status_code == 400
        sim.expire_tokens()
        assert c.get(f"users/{sim.user_uuid}/services", headers=auth).status_code == 401


def test_a_lone_surrogate_in_a_downloaded_row_is_replaced_and_the_list_still_loads(sim, cm):
    sim.add_barcode(sim.service, "ODD-1", ticket_type="Regular \udcff")  # sent as the escape "\udcff"

    async def run():
        async with gate(cm(strategy="local")) as (parts, sync_store):
            full = await scan(parts, "ODD-1")
            sim.update_barcode(sim.service, "OK-1", ticket_type="VIP \udcff")
            await parts.backend.sync(sync_store)  # a delta, written in this process
            names = await sync_store.call(lambda s: [s.ticket("cm", t)["name"] for t in ("ODD-1", "OK-1")])
            return full, await scan(parts, "OK-1"), names

    full, delta, names = asyncio.run(run())
    assert full.admitted and delta.admitted
    assert names == ["Regular \ufffd", "VIP \ufffd"]


def test_a_400_not_in_cms_info_message_shape_is_a_failed_call_decided_offline(sim, cm):
    async def run():
        async with gate(cm()) as (parts, _):
            sim.fail_status = 400  # answers {"message": ...}: not CM.com's {"info": {"message": ...}}
            return await scan(parts, "OK-1")

    decision = asyncio.run(run())
    assert (decision.verdict, decision.source) == (Verdict.ADMIT, Source.OFFLINE)


def test_gated_ready_compares_the_service_count_with_the_list_held_offline(sim, cm):
    async def main():
        async with gate(cm("local")) as (parts, sync_store):
            return await parts.backend.ticket_count(), await parts.store.call(parts.backend.offline_count)
    assert asyncio.run(main()) == (10, 10)


def test_a_services_list_with_an_entry_that_is_no_object_gives_no_count_not_a_crash(sim, cm):
    async def main():
        async with gate(cm("local")) as (parts, sync_store):
            backend = parts.backend
            services = [7, {"uuid": backend.service_uuid, "count_total_available": 10}]

            async def answer(*args, **kwargs):
                return httpx.Response(200, json={"services": services})
            backend._call = answer
            counted = await backend.ticket_count()
            services[1]["count_total_available"] = 2**64
            return counted, await backend.ticket_count()
    assert asyncio.run(main()) == (10, None)
