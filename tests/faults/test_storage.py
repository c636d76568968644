"""Storage faults: disk full, read-only, damaged file. Each one is logged with what the lane does, never a crash.

The lane's state under a store fault is `[store] on_error`: "deny" (default, fail-secure) denies a
scan that cannot be recorded with reason `error`; "admit" lets the decision stand and says on every
such scan that it was not recorded. A damaged file at start is moved aside and a fresh store made.

Disk full is SQLite's own SQLITE_FULL, reached with `PRAGMA max_page_count` on the scan path's
connection (in-process), and a real full filesystem: a 1 MiB tmpfs in a private mount namespace
of the daemon (root only). Read-only is that tmpfs remounted read-only under the running daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import gated_faults_backends as backends  # tests/faults/backends.py, registered by conftest.py
import pytest

from gated import cli
from gated.daemon import build
from gated.errors import StoreError
from gated.logs import MESSAGE_IDS
from gated.model import Reason, Scan, ScanMode, Source, Verdict, admit
from gated.store import Store, lists_dir

LOCAL = '[backend]\ntype = "local"\n[backend.local]\nmasks = ["DISK-######"]\n'


def _stored(path: Path) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return conn.execute("SELECT token, verdict, reason FROM scans ORDER BY id").fetchall()
    finally:
        conn.close()


async def _fill_until_full(parts, limit: int = 400):
    """Freeze the file at its current size, then scan until a record no longer fits."""
    await parts.store.call(lambda s: s.db.conn.execute(
        "PRAGMA max_page_count = " + str(s.db.conn.execute("PRAGMA page_count").fetchone()[0])))
    out = []
    for n in range(limit):
        decision = await parts.gate.handle(Scan(token=f"DISK-{n:06d}", reader="front"))
        out.append((f"DISK-{n:06d}", decision))
        if await parts.store.call(Store.count) < len(out):  # this one did not fit
            break
    for n in range(limit, limit + 3):  # the store stays full: what the next visitors get
        out.append((f"DISK-{n:06d}", await parts.gate.handle(Scan(token=f"DISK-{n:06d}", reader="front"))))
    return out


def test_disk_full_denies_each_unrecordable_scan_as_error_and_logs_it(load_config, caplog):
    caplog.set_level(logging.INFO, logger="gated")
    cfg = backends.quick(load_config(LOCAL))

    async def run():
        parts = await build(cfg)
        try:
            await parts.backend.sync(parts.store)
            scanned = await _fill_until_full(parts)
            await parts.store.call(lambda s: s.db.conn.execute("PRAGMA max_page_count = 1073741823"))
            after = await parts.gate.handle(Scan(token="DISK-999999", reader="front"))
            return scanned, after
        finally:
            await parts.close()

    scanned, after = asyncio.run(run())
    refused = [(t, d) for t, d in scanned if d.reason is Reason.ERROR]
    assert len(refused) == 4 and all(d.verdict is Verdict.DENY for _, d in refused)
    assert all("database or disk is full" in d.detail for _, d in refused)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4 and all(r.getMessage().startswith("scan not recorded, so not admitted: ")
                                    and r.GATED_EVENT == "store_error" for r in errors)
    assert "store_error" in MESSAGE_IDS  # journald shows these with the store_error MESSAGE_ID
    stored = _stored(Path(cfg.store.path))
    admitted = [t for t, d in scanned if d.admitted]
    assert [t for t, v, _ in stored if v == "admit"] == admitted + ["DISK-999999"]  # every admit was recorded
    assert not {t for t, _ in refused} & {t for t, _, _ in stored}
    assert after.admitted and after.reason is Reason.OK  # room again: the lane is back to normal


def test_disk_full_with_on_error_admit_keeps_the_lane_moving_and_says_so_on_every_scan(load_config, caplog,
                                                                                         tmp_path):
    caplog.set_level(logging.INFO, logger="gated")
    cfg = backends.quick(load_config(LOCAL + f'[store]\non_error = "admit"\npath = "{tmp_path / "gated.db"}"\n'))

    async def run():
        parts = await build(cfg)
        try:
            await parts.backend.sync(parts.store)
            return await _fill_until_full(parts)
        finally:
            await parts.close()

    scanned = asyncio.run(run())
    assert all(d.admitted and d.reason is Reason.OK for _, d in scanned)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4
    assert all('decision kept because [store] on_error = "admit": it will not be uploaded' in e for e in errors)
    stored = {t for t, _, _ in _stored(Path(cfg.store.path))}
    assert len(stored) == len(scanned) - 4  # the four scans made while full are nowhere but in the log


@pytest.mark.parametrize("damage", ["garbage", "overwritten_header_page", "truncated"])
def test_damaged_store_at_start_is_moved_aside_and_a_fresh_one_used(load_config, caplog, damage):
    caplog.set_level(logging.INFO, logger="gated")
    cfg = backends.quick(load_config(LOCAL))
    db = Path(cfg.store.path)
    Store(db).close()
    original = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(os.urandom(8192))
    elif damage == "overwritten_header_page":
        db.write_bytes(original[:100] + os.urandom(4096 - 100) + original[4096:])
    else:
        db.write_bytes(original[:1000])
    damaged = db.read_bytes()

    async def run():
        parts = await build(cfg)
        try:
            await parts.backend.sync(parts.store)
            return await parts.gate.handle(Scan(token="DISK-000001", reader="front"))
        finally:
            await parts.close()

    decision = asyncio.run(run())
    assert decision.admitted and decision.source is Source.OFFLINE
    (moved,) = list(db.parent.glob("gated.db.corrupt-*"))
    assert moved.read_bytes() == damaged  # kept as it was, for a technician
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.GATED_EVENT == "store_error" and error.GATED_STORE_MOVED == str(moved)
    assert f"moved aside to {moved} and started a fresh one" in error.getMessage()
    assert [t for t, _, _ in _stored(db)] == ["DISK-000001"]


def test_a_replaced_store_of_the_local_backend_follows_fallback_until_a_technician_accepts_it(
        load_config, caplog, capsys):
    caplog.set_level(logging.INFO, logger="gated")
    cfg = backends.quick(load_config(LOCAL + '[offline]\nfallback = "deny"\n'))
    db = Path(cfg.store.path)
    first = Store(db)
    for n in range(3):  # admitted before the damage: its history, which anti-passback relied on
        first.record(Scan(token=f"DISK-{n:06d}"), admit(ticket_key=f"DISK-{n:06d}"), lane="l", scan_mode=ScanMode.ENTRY,
                     latency_ms=1.0, queue_upload=False)
    first.close()
    data = db.read_bytes()
    db.write_bytes(data[:100] + os.urandom(4096 - 100) + data[4096:])  # the first page mangled

    async def scan(token):
        parts = await build(cfg)
        try:
            await parts.backend.sync(parts.store)
            return await parts.gate.handle(Scan(token=token, reader="front"))
        finally:
            await parts.close()

    before = asyncio.run(scan("DISK-000000"))
    (moved,) = list(db.parent.glob("gated.db.corrupt-*"))
    assert (before.verdict, before.reason) == (Verdict.DENY, Reason.STORE_REPLACED)  # not admitted again unseen
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("the admissions in the damaged store (an unknown number of scans) are lost" in w
               and "gated doctor --accept-new-store" in w for w in warnings)
    assert cli.main(["doctor", "--config", cfg.path, "--accept-new-store"]) == 0
    assert f"the damaged one stays at {moved}" in capsys.readouterr().out
    after = asyncio.run(scan("DISK-000001"))
    assert (after.verdict, after.reason) == (Verdict.ADMIT, Reason.OK)


def test_gated_run_on_a_damaged_store_starts_once_and_decides(write_config, run_gated):
    config = write_config(LOCAL)
    db = config.parent / "gated.db"
    db.write_bytes(b"this is not an SQLite file\n" * 100)
    gated = run_gated(config)
    gated.wait_line(r"ERROR: store damaged .*; moved aside to .*gated\.db\.corrupt-\d{8}T\d{6} and started a fresh")
    gated.wait_line(r"ready in \d+ ms")
    gated.feed("DISK-000042")
    m = gated.verdict()
    assert (m["word"], m["reason"], m["tail"]) == ("ADMIT", "ok", "0042")
    assert gated.stop() == 0
    assert len(list(config.parent.glob("gated.db.corrupt-*"))) == 1  # one start, one move: no loop


# --- real filesystem faults under a running daemon (root: a tmpfs in its own mount namespace) ----

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                                reason="needs root, unshare and nsenter for a private tmpfs")


def _in_namespace(pid: int, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *cmd], capture_output=True, text=True, timeout=20)


@pytest.fixture
def tmpfs_gate(write_config, run_gated, tmp_path):
    """`gated run` whose state directory is a 1 MiB tmpfs only it can see."""
    state = tmp_path / "state"
    state.mkdir()

    def start(extra: str = ""):
        config = write_config(LOCAL + extra + f'[store]\npath = "{state / "gated.db"}"\n')
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs -o size=1m,mode=0700 gated-test "{state}" && exec "$@"', "sh"]
        gated = run_gated(config, wrap=wrap)
        gated.wait_line(r"ready in \d+ ms")
        return gated, state

    return start


@needs_root
def test_full_filesystem_under_the_running_gate_denies_unrecordable_scans_until_space_returns(tmpfs_gate):
    gated, state = tmpfs_gate()
    gated.feed("DISK-000001")
    assert gated.verdict()["word"] == "ADMIT"
    fill = _in_namespace(gated.pid, "dd", "if=/dev/zero", f"of={state}/fill", "bs=64k")
    assert "No space left on device" in fill.stderr
    refused = None
    for n in range(2, 40):  # pages SQLite already holds may take a few more scans before one does not fit
        gated.feed(f"DISK-{n:06d}")
        m = gated.verdict()
        if m["word"] == "DENY":
            refused = m
            break
    assert refused is not None and refused["reason"] == "error"
    assert any("scan not recorded, so not admitted:" in line and "full" in line for line in gated.seen)
    # Housekeeping meets the full disk too (every 5 s): one plain line for it, no traceback.
    gated.wait_line(r"WARNING: store maintenance failed: .*full.*; the gate goes on deciding", timeout=15)
    gated.feed("DISK-000888")
    assert gated.verdict()["word"] == "DENY"
    assert _in_namespace(gated.pid, "rm", f"{state}/fill").returncode == 0
    gated.feed("DISK-000777")  # space is back: the lane admits again, without a restart
    m = gated.verdict()
    assert (m["word"], m["reason"], m["tail"]) == ("ADMIT", "ok", "0777"), "\n".join(gated.seen[-12:])
    assert gated.stop() == 0
    assert sum("store maintenance failed" in line for line in gated.seen) == 1
    assert not any("Traceback" in line or "failed unexpectedly" in line for line in gated.seen)


def _immutable(paths: list[Path], on: bool) -> bool:
    """chattr +i / -i: even root cannot write an immutable file, through fds already open too."""
    if not shutil.which("chattr"):
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True).returncode == 0


def test_store_made_read_only_under_the_running_gate_denies_and_logs_until_writable(write_config, run_gated):
    config = write_config(LOCAL)
    db = config.parent / "gated.db"
    gated = run_gated(config)
    gated.wait_line(r"ready in \d+ ms")
    gated.feed("DISK-000001")
    assert gated.verdict()["word"] == "ADMIT"
    files = [db, db.with_name("gated.db-wal"), db.with_name("gated.db-shm")]
    # A commit by another connection moves the WAL on, so the gate's next read must note a new read
    # mark in the mapped WAL index; written back first, that write faults: without the store's own
    # check, SIGBUS kills the daemon, as on an SD card remounted read-only.
    other = Store(db)
    other.set("moved-on", "1")
    other.close()
    os.sync()
    if not _immutable(files, True):
        pytest.skip("chattr +i is not possible here (needs root and a filesystem with the immutable flag)")
    try:
        gated.feed("DISK-000002", "DISK-000003")
        for tail in ("0002", "0003"):
            m = gated.verdict()
            assert (m["word"], m["reason"], m["tail"]) == ("DENY", "error", tail)
        assert sum("scan not recorded, so not admitted:" in line for line in gated.seen) == 2
    finally:
        _immutable(files, False)
    gated.feed("DISK-000004")
    m = gated.verdict()
    assert (m["word"], m["reason"], m["tail"]) == ("ADMIT", "ok", "0004")
    assert gated.stop() == 0
    assert [t for t, v, _ in _stored(db)] == ["DISK-000001", "DISK-000004"]


@needs_root
def test_a_gate_started_on_a_read_only_card_decides_and_records_again_once_it_is_writable(write_config, run_gated,
                                                                                          tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    seed = tmp_path / "seed.db"
    Store(seed).close()
    config = write_config(LOCAL + f'[store]\npath = "{state / "gated.db"}"\n')
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs gated-test "{state}" && cp "{seed}" "{state}/gated.db" '
            f'&& mount -o remount,ro "{state}" && exec "$@"', "sh"]
    gated = run_gated(config, wrap=wrap)
    # It starts (no restart loop, relay set up) and says at once what it cannot do.
    gated.wait_line(r"ERROR: store .*gated\.db cannot be written \(the filesystem is read-only\): scans are not "
                    r'recorded; \[store\] on_error = "deny": nothing is admitted until it can be written')
    gated.wait_line(r"ready in \d+ ms")
    gated.feed("DISK-000001")
    m = gated.verdict()
    assert (m["word"], m["reason"], m["tail"]) == ("DENY", "error", "0001")
    assert _in_namespace(gated.pid, "mount", "-o", "remount,rw", str(state)).returncode == 0
    gated.wait_line(r"store .*gated\.db can be written again: scans are recorded again", timeout=15)
    gated.feed("DISK-000002")
    m = gated.verdict()
    assert (m["word"], m["reason"], m["tail"]) == ("ADMIT", "ok", "0002")
    assert gated.stop() == 0
    assert not any("Traceback" in line for line in gated.seen)


def test_a_gate_started_on_an_immutable_store_with_on_error_admit_still_decides_from_its_list_and_history(
        write_config, run_gated, tickets_csv, tmp_path):
    tickets_csv("token\nLIST-000001\nLIST-000002\n")
    config = write_config('[backend]\ntype = "local"\n[backend.local]\ntickets = "tickets.csv"\n'
                          f'[store]\non_error = "admit"\npath = "{tmp_path / "gated.db"}"\n')
    gated = run_gated(config)
    gated.wait_line(r"ready in \d+ ms")
    gated.feed("LIST-000001")
    assert gated.verdict()["word"] == "ADMIT"
    assert gated.stop() == 0
    db = tmp_path / "gated.db"
    files = [db, *lists_dir(db).glob("*.sqlite")]
    if not _immutable(files, True):
        pytest.skip("chattr +i is not possible here (needs root and a filesystem with the immutable flag)")
    try:
        gated = run_gated(config)
        gated.wait_line(r'ERROR: store .* cannot be written \(.*gated\.db is immutable \(chattr \+i\)\): scans are not '
                        r'recorded; \[store\] on_error = "admit"')
        gated.wait_line(r"ready in \d+ ms")
        gated.feed("LIST-000009", "LIST-000001", "LIST-000002")
        unknown, again, listed = gated.verdict(), gated.verdict(), gated.verdict()
        assert gated.stop() == 0
    finally:
        _immutable(files, False)
    # The list and the admissions were read from the read-only store: an unknown code is still refused,
    # a ticket admitted before it turned read-only too, a listed one admitted and said to be unrecorded.
    assert (unknown["word"], unknown["reason"]) == ("DENY", "unknown")
    assert (again["word"], again["reason"]) == ("DENY", "already_used")
    assert (listed["word"], listed["reason"]) == ("ADMIT", "ok")
    assert any('decision kept because [store] on_error = "admit"' in line for line in gated.seen)
    assert [t for t, _, _ in _stored(db)] == ["LIST-000001"]  # only the scan from before


# --- the store failing while a scan is decided ----------------------------------------------------


@pytest.mark.parametrize(("on_error", "word", "reason"), [("deny", Verdict.DENY, Reason.ERROR),
                                                          ("admit", Verdict.ADMIT, Reason.FALLBACK_ADMIT)])
def test_a_store_that_cannot_be_read_while_deciding_follows_on_error(load_config, tickets_csv, caplog, tmp_path,
                                                                     on_error, word, reason):
    caplog.set_level(logging.INFO, logger="gated")
    tickets_csv("token\nLIST-000001\n")
    cfg = backends.quick(load_config('[backend]\ntype = "local"\n[backend.local]\ntickets = "tickets.csv"\n'
                             f'[store]\non_error = "{on_error}"\npath = "{tmp_path / "gated.db"}"\n'))

    async def run():
        parts = await build(cfg)
        try:
            await parts.backend.sync(parts.store)
            (listed,) = lists_dir(cfg.store.path).glob("*.sqlite")
            damage = sqlite3.connect(listed)  # the ticket list's table gone under the gate
            damage.execute("DROP TABLE tickets")
            damage.commit()
            damage.close()
            return await parts.gate.handle(Scan(token="LIST-000001", reader="front"))
        finally:
            await parts.close()

    decision = asyncio.run(run())
    assert (decision.verdict, decision.reason) == (word, reason) and "no such table" in decision.detail
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.GATED_EVENT == "store_error" and "no such table: " in error.getMessage()


@pytest.mark.parametrize("damage", ["garbage", "missing"])
def test_a_damaged_ticket_list_file_is_loaded_again_at_the_next_sync(load_config, tickets_csv, tmp_path, damage):
    # The CSV has not changed, so without the damage noted the local backend would never import it again.
    tickets_csv("token\nLIST-000001\n")
    cfg = backends.quick(load_config('[backend]\ntype = "local"\n[backend.local]\ntickets = "tickets.csv"\n'
                             f'[store]\npath = "{tmp_path / "gated.db"}"\n'))

    async def run():
        parts = await build(cfg)
        await parts.backend.sync(parts.store)
        await parts.close()
        (listed,) = lists_dir(cfg.store.path).glob("*.sqlite")
        if damage == "garbage":
            listed.write_bytes(b"not a database, a sector the card mangled" * 100)
        else:
            listed.unlink()
        parts = await build(cfg)  # the gate restarted on the damaged list
        try:
            failed = await parts.gate.handle(Scan(token="LIST-000001", reader="front"))
            await parts.backend.sync(parts.store)
            return failed, await parts.gate.handle(Scan(token="LIST-000001", reader="front"))
        finally:
            await parts.close()

    failed, after = asyncio.run(run())
    assert (failed.verdict, failed.reason) == (Verdict.DENY, Reason.ERROR)
    assert (after.verdict, after.reason) == (Verdict.ADMIT, Reason.OK)


def test_offline_data_of_an_unexpected_shape_costs_one_denied_scan_not_the_gate(make_kit, load_config, caplog):
    caplog.set_level(logging.INFO, logger="gated")
    kit = make_kit("pretix")
    cfg = backends.quick(load_config(kit.toml(kit.sim.url)))

    async def run():
        parts = await build(cfg)
        try:
            await kit.prepare(parts)
            kit.sim.fail_status = 503
            await parts.store.call(lambda s: s.db.conn.execute(  # as an older gated might have left it
                "UPDATE offline_data SET value = '[]' WHERE name LIKE 'pretix:%'"))
            broken = await parts.gate.handle(Scan(token=kit.tokens[0], reader="front"))
            kit.sim.fail_status = None
            await parts.backend.sync(parts.store)  # fresh data from pretix repairs it
            kit.sim.fail_status = 503
            return broken, await parts.gate.handle(Scan(token=kit.tokens[1], reader="front"))
        finally:
            await parts.close()

    broken, repaired = asyncio.run(run())
    assert (broken.verdict, broken.reason, broken.detail) == (Verdict.DENY, Reason.ERROR, "AttributeError in gated")
    assert repaired.admitted and repaired.source is Source.OFFLINE
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "deciding a scan failed unexpectedly; denied" and error.exc_info


def test_a_store_path_naming_some_other_file_is_refused_not_moved(load_config, tmp_path):
    other = tmp_path / "gated.toml.bak"  # an installer's slip: [store] path names a text file
    other.write_text("[lane]\nname = 'north-3'\n" * 50)
    cfg = backends.quick(load_config(LOCAL + f'[store]\npath = "{other}"\n'))
    with pytest.raises(StoreError, match="not moved aside, it does not look like a store: check \\[store\\] path"):
        asyncio.run(build(cfg))
    assert other.exists() and not list(tmp_path.glob("*.corrupt-*"))


def test_a_replaced_store_of_an_online_backend_says_when_its_first_sync_ends_the_fallback(
        make_kit, load_config, caplog, monkeypatch):
    from tests.drivers.support import until
    from tests.test_daemon import run_daemon

    kit = make_kit("entry", n_tokens=1)
    cfg = backends.quick(load_config(kit.toml(kit.sim.url)))
    db = Path(cfg.store.path)
    first = Store(db)
    first.set("k", "v")
    first.close()
    data = db.read_bytes()
    db.write_bytes(data[:100] + os.urandom(4096 - 100) + data[4096:])  # the first page mangled
    caplog.set_level(logging.INFO, logger="gated")

    async def scenario(daemon, type_line):
        await until(lambda: any("store_accepted" == getattr(r, "GATED_EVENT", "") for r in caplog.records),
                    what="the replaced store accepted after the sync", timeout=10)
        return await daemon.syncer.store.call(Store.replaced)

    code, replaced = run_daemon(cfg, monkeypatch, scenario)
    assert code == 0 and replaced is None
    line = next(r.getMessage() for r in caplog.records if getattr(r, "GATED_EVENT", "") == "store_accepted")
    assert "offline decisions follow the offline rules again" in line
