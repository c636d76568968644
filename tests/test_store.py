"""The SQLite store on disk: durability settings, ticket list generations, queue states, pruning."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import gc
import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
import sqlite_utils

from gated.errors import StoreError
from gated.model import Reason, Scan, ScanMode, Source, admit, deny
from gated.store import Store, StoreThread, keep_wal
from gated.store import lists as store_lists
from gated.store import wal as store_wal
from gated.store.migrations import migrations


def record(store: Store, token: str, *, admitted=True, queue=False, wall=None, key=None) -> Scan:
    scan = Scan(token=token, reader="front", wall=wall or time.time())
    d = admit(Reason.OK, Source.OFFLINE, backend="x", ticket_key=key or token) if admitted \
        else deny(Reason.UNKNOWN, backend="x")
    store.record(scan, d, lane="l1", scan_mode=ScanMode.ENTRY, latency_ms=1.0, queue_upload=queue)
    return scan


def test_store_is_wal_with_full_sync_and_owner_only(tmp_path):
    s = Store(tmp_path / "g.db")
    assert s.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert s.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert stat.S_IMODE(os.stat(tmp_path / "g.db").st_mode) == 0o600
    s.close()


def test_after_a_checkpoint_scans_are_written_over_the_wal_not_onto_its_end(tmp_path, monkeypatch):
    # A WAL written over needs no new blocks, so a scan's fsync needs no journal commit of the
    # filesystem (Store.checkpoint); a burst's WAL is cut back, so the card keeps its space.
    monkeypatch.setattr(store_wal, "WAL_KEEP_BYTES", 1024 * 1024)  # 16 MiB at a test's scale
    monkeypatch.setattr(store_wal, "WAL_SHRINK_STEP", 256 * 1024)
    scans, housekeeping = StoreThread(tmp_path / "g.db"), StoreThread(tmp_path / "g.db", "housekeeping")
    wal = tmp_path / "g.db-wal"

    def scan(n: int) -> None:
        for _ in range(n):
            scans.call_sync(record, f"T-{os.urandom(4).hex()}")

    scan(20)
    asyncio.run(keep_wal(housekeeping, scans))
    before = wal.stat().st_size
    scan(10)
    assert wal.stat().st_size == before  # the same file, written from its start again
    scan(170)  # a burst: the WAL grows past what is kept...
    asyncio.run(keep_wal(housekeeping, scans))  # ...is checkpointed, but not cut while it may go on...
    assert wal.stat().st_size > 1024 * 1024
    scan(1)  # ...a scan's commit starts it again but leaves its size alone...
    assert wal.stat().st_size > 1024 * 1024
    asyncio.run(keep_wal(housekeeping, scans))  # ...the burst over, the upkeep cuts it back in steps
    assert wal.stat().st_size <= 1024 * 1024
    scan(170)
    asyncio.run(keep_wal(housekeeping, scans))
    asyncio.run(keep_wal(housekeeping, scans))  # a burst then nothing: cut back without a scan
    assert wal.stat().st_size <= 1024 * 1024
    scan(1)
    assert wal.stat().st_size <= 1024 * 1024
    assert scans.call_sync(Store.count) == 372  # nothing lost on the way
    housekeeping.close()
    scans.close()


def test_a_new_list_file_is_written_back_a_slice_at_a_time(tmp_path):
    # Without the C library's sync_file_range the list would be written back in one fsync (and a
    # scan's commit queue behind all of it): the binding must work where gated runs.
    sync_range = store_wal.libc_sync_file_range()
    if os.uname().sysname != "Linux":
        assert sync_range is None
        return
    path = tmp_path / "list.sqlite"
    path.write_bytes(os.urandom(3 * store_wal.WRITEBACK_SLICE + 1))
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, path.stat().st_size, store_wal.WRITEBACK_SLICE):
            sync_range(fd, offset, store_wal.WRITEBACK_SLICE)
        with pytest.raises(OSError):
            sync_range(-1, 0, 1)  # a failure is an OSError
    finally:
        os.close(fd)


@pytest.mark.parametrize(("err", "raised"), [(errno.EPERM, False), (errno.ENOSYS, False), (errno.EIO, True)])
def test_a_write_error_while_writing_a_list_back_is_raised_not_covered_by_the_fsync(tmp_path, monkeypatch, err,
                                                                                      raised):
    # sync_file_range reports a write error once; the fsync after it on the same file would say all
    # is well, and a list with pages never written would become current. Refused: fsync does it all.
    calls = []

    def failing(fd: int, offset: int, length: int) -> None:
        calls.append(offset)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(store_wal, "libc_sync_file_range", lambda: failing)
    path = tmp_path / "list.sqlite"
    path.write_bytes(b"x" * 10)
    if raised:
        with pytest.raises(OSError):
            store_wal.write_back(path)
    else:
        store_wal.write_back(path)
    assert calls == [0]


def test_recorded_scan_survives_reopen_and_counts_for_antipassback(tmp_path):
    s = Store(tmp_path / "g.db")
    scan = record(s, "T-1")
    s.close()
    s = Store(tmp_path / "g.db")
    assert s.scan(scan.nonce)["token"] == "T-1"
    assert s.inside("T-1") == (1, 0)
    assert s.high_water() == scan.wall


def test_not_passed_gives_the_entry_back(tmp_path):
    s = Store(tmp_path / "g.db")
    scan = record(s, "T-1")
    s.mark_passed(scan.nonce, False)
    assert s.inside("T-1") == (0, 0) and s.scan(scan.nonce)["passed"] == 0


def test_ticket_list_reload_swaps_whole_generations(tmp_path):
    s = Store(tmp_path / "g.db")
    s.load_tickets("local", [{"token": f"A{i}"} for i in range(5000)], chunk=1000)
    assert s.ticket_count("local") == 5000 and s.ticket("local", "A42")["max_entries"] == 1
    s.load_tickets("local", [{"token": "B1", "name": "Bea", "max_entries": 3}])
    assert s.ticket("local", "A42") is None and s.ticket("local", "B1")["name"] == "Bea"
    assert len(list(s.lists_dir.glob("*.sqlite"))) == 1  # the old generation's file is gone


def test_a_list_that_fails_half_way_leaves_the_old_one_current(tmp_path):
    s = Store(tmp_path / "g.db")
    s.load_tickets("local", [{"token": "OLD"}])

    def broken():
        yield {"token": "NEW1"}
        raise ValueError("line 2: bad date")

    try:
        s.load_tickets("local", broken(), chunk=1)
    except ValueError:
        pass
    assert s.ticket("local", "OLD") is not None and s.ticket("local", "NEW1") is None
    assert len(list(s.lists_dir.glob("*.sqlite"))) == 1  # the half-written file is gone


def test_queue_states_pending_sent_parked_retry(tmp_path):
    s = Store(tmp_path / "g.db")
    a, b, c = (record(s, t, queue=True) for t in ("A", "B", "C"))
    record(s, "D", queue=False)
    assert [r["nonce"] for r in s.pending(10)] == [a.nonce, b.nonce, c.nonce]
    s.mark_sent([a.nonce])
    s.mark_parked(b.nonce, "HTTP 422: unknown event")
    stats = s.queue_stats()
    assert (stats.pending, stats.parked) == (1, 1) and stats.oldest_pending == c.wall
    assert s.parked()[0]["upload_error"] == "HTTP 422: unknown event"
    assert s.retry_parked() == 1 and [r["nonce"] for r in s.pending(10)] == [b.nonce, c.nonce]


def test_prune_forgets_tokens_then_rows_but_never_unsent_scans(tmp_path):
    s = Store(tmp_path / "g.db")
    now = time.time()
    old_sent = record(s, "OLD", queue=True, wall=now - 40 * 86400)
    s.mark_sent([old_sent.nonce])
    old_unsent = record(s, "UNSENT", queue=True, wall=now - 40 * 86400)
    recent = record(s, "RECENT", wall=now - 7200)
    assert s.prune(30 * 86400, now=now) == 1
    assert s.scan(old_sent.nonce) is None
    assert s.scan(old_unsent.nonce)["token"] == "UNSENT"  # still to upload: untouched
    assert s.scan(recent.nonce)["token"] is None and s.scan(recent.nonce)["token_hash"]


def test_ticket_list_files_are_owner_only(tmp_path):
    s = Store(tmp_path / "g.db")
    s.load_tickets("local", [{"token": "A1", "name": "Ada"}])
    (listed,) = s.lists_dir.glob("*.sqlite")
    assert stat.S_IMODE(os.stat(s.lists_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(listed).st_mode) == 0o600
    s.close()


def test_a_file_left_by_a_load_that_was_killed_is_removed_by_the_next_load(tmp_path):
    s = Store(tmp_path / "g.db")
    s.load_tickets("local", [{"token": "OLD"}])
    # What a reload process killed half way leaves: its file, named by loading:<list> only.
    half = s.lists_dir / "local.1.sqlite"
    half.write_bytes(b"half a list")
    s.set("loading:local", half.name)
    stray = s.lists_dir / "cm.2.sqlite"  # named by nothing at all (a store moved aside)
    stray.write_bytes(b"")
    s.load_tickets("local", [{"token": "NEW"}])
    assert not half.exists() and not stray.exists() and s.get("loading:local") is None
    assert s.ticket("local", "NEW") is not None and len(list(s.lists_dir.glob("*.sqlite"))) == 1
    s.close()


def test_a_list_switched_by_another_process_is_read_from_its_new_file(tmp_path):
    loader, scans = Store(tmp_path / "g.db"), Store(tmp_path / "g.db")
    loader.load_tickets("cm", [{"token": "FIRST"}])
    assert scans.ticket("cm", "FIRST") is not None  # the scan path now holds the first file open
    loader.load_tickets("cm", [{"token": "SECOND"}])  # and the loader removed that file
    assert scans.ticket("cm", "SECOND") is not None and scans.ticket("cm", "FIRST") is None
    loader.upsert_tickets("cm", [{"token": "THIRD", "max_entries": 2}])
    assert scans.ticket("cm", "THIRD")["max_entries"] == 2 and scans.ticket_count("cm") == 2
    loader.close()
    scans.close()


def test_the_file_of_a_list_switched_by_another_process_is_let_go_not_kept_open(tmp_path):
    """A daemon reloading its list every few hours must not hold each replaced 30 MB file open.
    (That it is let go off the scan path is a latency matter: the CM.com reload benchmark.)"""
    def held_deleted_lists() -> list[str]:
        held = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed since listed
                continue
            if "g.db-tickets" in target and target.endswith(" (deleted)"):
                held.append(target)
        return held

    loader, scans = Store(tmp_path / "g.db"), Store(tmp_path / "g.db")
    loader.load_tickets("cm", [{"token": "FIRST"}])
    assert scans.ticket("cm", "FIRST") is not None
    loader.load_tickets("cm", [{"token": "SECOND"}])
    held_before = held_deleted_lists()  # the scan path still reads the first file: it must hold it
    assert scans.ticket("cm", "SECOND") is not None  # switched: the first is let go, off this thread
    deadline = time.monotonic() + 5
    while held_deleted_lists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert held_before and held_deleted_lists() == []
    loader.close()
    scans.close()


def test_one_store_closing_leaves_another_in_the_same_process_its_list_intact(tmp_path):
    """The daemon has two stores (scans, syncer) on the same list. Closing a descriptor drops every
    lock the process holds on the file; another process closing the list would then think itself
    the last reader and delete the WAL under the store still writing deltas into it."""
    loader = Store(tmp_path / "g.db")
    loader.load_tickets("cm", [{"token": "A"}])
    closing, staying = Store(tmp_path / "g.db"), Store(tmp_path / "g.db")
    assert closing.ticket("cm", "A") and staying.ticket("cm", "A")
    staying.upsert_tickets("cm", [{"token": "B"}])  # the list's WAL now holds B
    path = staying.lists_dir / loader.get("tickets:cm")
    loader.close()
    closing.close()
    subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                    "c.execute('SELECT count(*) FROM tickets').fetchall(); c.close()", str(path)], check=True)
    staying.upsert_tickets("cm", [{"token": "C"}])
    fresh = sqlite3.connect(path)
    try:
        assert fresh.execute("SELECT token FROM tickets ORDER BY token").fetchall() == [("A",), ("B",), ("C",)]
    finally:
        fresh.close()
        staying.close()


def test_a_replaced_list_let_go_while_another_store_opens_it_keeps_one_descriptor(tmp_path, monkeypatch):
    """The scan store retires a replaced list on a thread of its own just as the syncer's store,
    which read the pointer before the switch, opens it: the two share one descriptor, and the
    late close leaves it to the syncer's store (a second one, closed, would drop its locks)."""
    loader, scans, syncer = (Store(tmp_path / "g.db") for _ in range(3))
    loader.load_tickets("cm", [{"token": "A"}])
    old = scans.lists_dir / loader.get("tickets:cm")
    assert scans.ticket("cm", "A")
    late = []
    monkeypatch.setattr(store_lists.threading, "Thread", lambda target, args, **kw: type(
        "Held", (), {"start": lambda self: late.append((target, args))})())
    scans._lists.pop("cm").retire()  # its last user: the descriptor's close waits for its thread
    opened = store_lists.ListFile.open(old.parent, old.name)  # the syncer's, just then

    def descriptors() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}") == str(old.resolve()))

    def locked() -> bool:  # this process's POSIX locks on the file (SQLite's, in WAL mode)
        inode = os.stat(old).st_ino
        with open("/proc/locks") as f:
            return any(f":{inode} " in line and f" {os.getpid()} " in line for line in f)

    held_meanwhile = descriptors()  # SQLite's connection and the one held: not a third
    for target, args in late:  # the retire thread runs now
        target(*args)
    assert late and held_meanwhile == 2 and locked()
    opened.close()
    assert descriptors() == 0
    for store in (loader, scans, syncer):
        store.close()


def test_a_store_from_before_list_files_keeps_its_lists_through_the_upgrade(tmp_path):
    path = tmp_path / "g.db"
    db = sqlite_utils.Database(path)
    migrations.apply(db, stop_before="m003_ticket_lists_in_files")
    db.execute("INSERT INTO tickets (backend, token, name, max_entries) VALUES ('local@1', 'KEPT-1', 'Kay', 2)")
    db.execute("INSERT INTO tickets (backend, token) VALUES ('local@0', 'STALE-1')")  # an old generation
    db.execute("INSERT INTO kv (key, value) VALUES ('tickets:local', 'local@1')")
    db.conn.commit()
    db.close()
    s = Store(path)
    assert s.ticket("local", "KEPT-1")["name"] == "Kay" and s.ticket("local", "STALE-1") is None
    assert s.ticket_count("local") == 1
    assert "tickets" not in s.db.table_names()
    s.close()


def test_a_load_waits_for_another_process_loading_the_same_list_and_gives_up_with_a_reason(tmp_path, monkeypatch):
    s = Store(tmp_path / "g.db")
    s.load_tickets("cm", [{"token": "OLD"}])
    lock = os.open(s.lists_dir / ".cm.lock", os.O_RDONLY)  # what a `gated scan` stopped mid-load holds
    fcntl.flock(lock, fcntl.LOCK_EX)
    monkeypatch.setattr(store_lists, "LIST_LOCK_WAIT", 0.3)
    try:
        with pytest.raises(StoreError, match="another process has been loading the cm list"):
            s.load_tickets("cm", [{"token": "NEW"}])
    finally:
        os.close(lock)
    assert s.ticket("cm", "OLD") is not None  # the list in use is untouched
    s.load_tickets("cm", [{"token": "NEW"}])  # and once it is let go, the load goes through
    assert s.ticket("cm", "NEW") is not None
    s.close()


def test_a_store_closed_after_its_files_turned_immutable_closes_without_sigbus(tmp_path):
    """Closing the last connection checkpoints the WAL, writing SQLite's mapped WAL index: on a file
    that cannot be written any more that was SIGBUS, e.g. at the daemon's stop on a failing card."""
    db = tmp_path / "g.db"
    script = """
import os, subprocess, sys
from gated.store import Store
db = sys.argv[1]
store = Store(db)
store.set("a", "1")
store.db.conn.execute("SELECT count(*) FROM kv").fetchone()
other = Store(db)
other.set("b", "2")  # moves the WAL on
other.close()
os.sync()
files = [db, db + "-wal", db + "-shm"]
if subprocess.run(["chattr", "+i", *files], capture_output=True).returncode != 0:
    sys.exit(3)
try:
    store.close()
finally:
    subprocess.run(["chattr", "-i", *files])
print("closed")
"""
    done = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True, text=True, timeout=60)
    if done.returncode == 3:
        pytest.skip("chattr +i is not possible here (needs root and a filesystem with the immutable flag)")
    assert (done.returncode, done.stdout) == (0, "closed\n"), done.stderr
    assert Store(db).get("b") == "2"  # nothing lost: the WAL is read at the next open


def test_a_store_on_storage_that_cannot_be_written_opens_read_only_when_allowed(tmp_path):
    db = tmp_path / "g.db"
    with_data = Store(db)
    record(with_data, "T-1")
    with_data.close()
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (needs root and a filesystem with the immutable flag)")
    try:
        store = Store(db, read_only_ok=True)
        try:
            assert store.read_only == f"{db} is immutable (chattr +i)"
            assert store.inside("T-1") == (1, 0)  # admissions can still be read: anti-passback works
            with pytest.raises(StoreError, match="cannot be written: .* is immutable"):
                record(store, "T-2")
        finally:
            store.close()
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)


def test_stores_opened_and_closed_leave_no_descriptor_behind(tmp_path):
    """A lane that switches its store read-only and back, or a command run beside the daemon, opens
    and closes stores for days: every close gives back what the open took, flag descriptors too."""
    def open_fds() -> int:
        gc.collect()  # earlier tests' Stores left unclosed let their descriptors go when collected
        return len(os.listdir("/proc/self/fd"))

    def cycle(i: int) -> None:
        store = Store(tmp_path / f"gated-{i % 3}.db")
        store.check_writable()
        store.set("k", str(i))
        store.close()

    cycle(0)
    before = open_fds()
    for i in range(1, 60):
        cycle(i)
    assert open_fds() == before


def test_other_lanes_admissions_still_count_after_the_store_is_opened_again(tmp_path):
    """The daemon closes and reopens its store when the card turns read-only and back: a ticket another
    lane admitted must stay `already used` here afterwards, not only until the first reopen."""
    def shared(token: str) -> str:
        return "venue:" + token  # stands for the venue-keyed HMAC of gated.mqtt

    async def run() -> tuple[tuple[int, int], tuple[int, int]]:
        st = StoreThread(tmp_path / "gated.db", "store", read_only_ok=True)
        try:
            st.call_sync(Store.share_identities, shared)
            st.call_sync(Store.record_shared, [("nonce-b-1", shared("T-1"), "entry", time.time(), "lane-b")])
            before = await st.call(Store.inside, "T-1")
            await st.close_store()
            await st.open_store()
            return before, await st.call(Store.inside, "T-1")
        finally:
            st.close()

    before, after = asyncio.run(run())
    assert before == after == (1, 0)


@pytest.mark.parametrize("row", ['{"moved": "/x", "scans": 3', '[1, 2]', '{"moved": 1, "scans": "many", "at": 1e400}',
                                 '{"at": NaN, "scans": -5}', '{"at": "yesterday"}'])
def test_a_damaged_replaced_row_still_means_replaced_and_never_raises(tmp_path, row):
    # The decider reads replaced() on every offline scan: a damaged kv row must not turn each scan
    # into an exception, and the lost history it stands for must still be reported.
    s = Store(tmp_path / "g.db")
    s.set("store_replaced", row)
    info = s.replaced()
    assert info is not None and isinstance(info["moved"], str)
    assert info["scans"] is None or (type(info["scans"]) is int and info["scans"] >= 0)
    assert info["at"] is None or 0 <= info["at"] < 1e11
    s.close()


def test_closing_one_store_keeps_the_locks_another_store_of_the_process_holds_on_the_wal_index(tmp_path):
    """Closing any descriptor of a file drops every POSIX lock the process holds on it. The daemon has
    several Stores on one file (scan path, syncer, NFC keys): one closing must not take away the
    others' SQLite locks on gated.db-shm, whose shared DMS lock tells other processes the WAL index is
    in use (without it, the next process to open the store would reinitialise it under them)."""
    path = tmp_path / "gated.db"
    first, second = Store(path), Store(path)
    for store in (first, second):
        store.check_writable()  # as StoreThread does before every call
        store.get("k")
    first.close()
    # SQLite's unix VFS: the DMS byte of the -shm file sits after its 8 lock bytes, at 120 + 8.
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)\nexcept OSError:\n    sys.exit(3)\n")
    held = subprocess.run([sys.executable, "-c", probe, f"{path}-shm"]).returncode == 3
    second.close()
    assert held
